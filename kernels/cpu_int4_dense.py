"""4-bit weights on CPU as a dense matmul: the whole weight dequantized on every call, then
one bf16/fp16 matmul (or fp32 on CPUs without native bf16 matmuls).

torch's int4 matmul dequantizes the weight again for every 4 rows of x, so from a number of
rows (`cpu_int4.dense_from`) dequantizing the whole weight once per call and running a
dense matmul is faster; cpu_int4 switches to this kernel there.

The dequantization reads the module's own int32 words as bytes (two codes per byte, low
nibble first on a little-endian host) and computes (u - 8 - z) * s per group in fp32, then
casts once, as the reference does (bit-equal: tests/test_kernels.py); in fp32 those passes
run faster than in bf16, which torch widens per operation. On CPUs without native bf16
matmuls (AVX2; `cpu_dense.native_bf16`) the product runs in fp32 on those bf16 weights
widened to fp32 (exactly: the same products, summed in fp32 and rounded once, as a bf16
matmul sums them), several times faster there than a bf16 matmul.
The state keeps only the per-group offsets and scales; no dense copy outlives a call.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_codes, cpu_dense, reference
from .base import Kernel, LayerSpec, Unsupported
from .cpu_codes import Codes

DEQUANT_BLOCK = reference.CHUNK_ELEMS  # larger weights are dequantized in blocks of rows this size


@dataclass(frozen=True)
class DenseState:
    offset: torch.Tensor  # fp32 [N, n_groups, 1]: 8 + z
    scale: torch.Tensor  # fp32 [N, n_groups, 1]


def usable(codes: Codes, K: int) -> bool:
    """Whether the packed words can be read as bytes in K order: no act-order permutation,
    a little-endian host, whole words per row."""
    return codes.perm is None and sys.byteorder == "little" and K % 8 == 0


def build(codes: Codes) -> DenseState:
    return DenseState((codes.z + 8)[..., None], codes.scale[..., None])


def can_implement(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    ok, reason = cpu_codes.can_implement(spec, device)
    if not ok:
        return False, reason
    if spec.act_order or spec.in_features % 8 or sys.byteorder != "little":
        return False, "reads the packed words as bytes in K order: no act-order, in_features % 8 == 0, little-endian"
    return True, "whole weight dequantized per call, then a dense matmul (fp32 without native bf16)"


def prepare(module) -> DenseState:
    codes = cpu_codes.read_codes(module)
    if not usable(codes, module.in_features):
        raise Unsupported("the packed words cannot be read as bytes in K order")
    return build(codes)


def dense_weight(module, state: DenseState, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype` (bf16/fp16), from the module's packed words (see above)."""
    offset, scale = state.offset, state.scale
    N, K = module.out_features, module.in_features
    b = module.weight_packed.view(torch.uint8)  # [N, K / 2]
    rows = max(1, DEQUANT_BLOCK // K)
    if rows >= N:
        return _dequantize_rows(b, offset, scale, dtype).view(N, K)
    out = torch.empty(N, K, dtype=dtype)  # in blocks of rows whose temporaries stay in cache
    for i in range(0, N, rows):
        out[i:i + rows] = _dequantize_rows(b[i:i + rows], offset[i:i + rows], scale[i:i + rows], dtype).view(-1, K)
    return out


def _dequantize_rows(b: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed bytes [n, K / 2] -> weights [n, groups, group] in `dtype`."""
    # Byte j of a row holds codes 2j (low nibble) and 2j + 1 (high). Widened to int16, the
    # low nibble stays in the low byte and the high one moves to the high byte: viewed as
    # bytes again, the codes come out in order (faster than interleaving them with stack).
    w = b.to(torch.int16)
    u = ((w & 15) | ((w << 4) & 0x0F00)).view(torch.uint8).view(b.shape[0], offset.shape[1], -1).float()
    return u.sub_(offset).mul_(scale).to(dtype)


def linear(x: torch.Tensor, module, state: DenseState) -> torch.Tensor:
    """x [..., K] (bf16/fp16): the whole weight dequantized, then one matmul, in fp32 where
    this CPU has no native bf16 matmul (see above)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    w = dense_weight(module, state, x2.dtype)
    if cpu_dense.native_bf16():
        y = F.linear(x2, w, module.bias)
    else:
        y = cpu_dense.fp32_linear(x2, w.float(), module.bias, x2.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], module.out_features)


ENTRY = Kernel("cpu_int4_dense", can_implement, prepare, linear)
