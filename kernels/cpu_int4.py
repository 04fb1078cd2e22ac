"""CPU kernel for 4-bit weights: AMX tiles where the CPU has them (cpu_int4_amx), else
torch's own int4 matmul (`_weight_int4pack_mm_for_cpu`).

Where `cpu_int4_amx.available()` (Intel Sapphire Rapids and later, x86-64 Linux, a C
compiler) and the groups are whole multiples of 32 columns, bf16 activations of any number
of rows run on cpu_int4_amx: 1.5-3.5x faster than torch's int4 matmul at 8 rows on
SmolLM2's layers, 2.7-6.0x from 16 rows, and faster than the dense path below 256 rows (at
256-512 rows within 5% of it on SmolLM2's layers, 1.6x faster on 4096 x 4096)
(bench/results/kernels_cpu.md). The rest of this docstring is the path without it.

torch computes x @ W^T with W[n, k] = (u - 8) * scale[g, n] + zero[g, n] straight from
packed nibbles (u in 0..15, g = k // group), reading 4-bit weights instead of a dense
copy. Our codes map onto it exactly: u = q + 8 and w = (q - z) * s, so scale = s and
zero = -z * s (0 when symmetric). torch takes group sizes 32..256; a per-channel scale is
replicated over 256/128/64/32-column groups, which changes nothing numerically.
act-order: K is reordered by g_idx as in the Triton kernel (x's columns follow).

Layout built once per layer (`prepare`): torch's packed uint8 weight, a [n_groups, N, 2]
(scale, zero) table per activation dtype, and the column permutation or None.
torch's int4 matmul dequantizes the weight again for every 4 rows of x, so its time grows
with the rows; from `DENSE_FROM` rows, dequantizing the whole weight once and running a
dense matmul is faster. That dequantization reads the module's own int32 words as bytes
(two codes per byte, low nibble first on a little-endian host) and computes
(u - 8 - z) * s per group in fp32, then casts once, as the reference does (bit-equal); in
fp32 those passes run faster than in bf16, which torch widens per operation. On CPUs
without native bf16 matmuls (AVX2; `cpu_dense.native_bf16`) the product runs in fp32 on
those bf16 weights widened to fp32 (exactly: the same products, summed in fp32 and
rounded once, as a bf16 matmul sums them), several times faster there than a bf16 matmul. float32
activations take the reference, where torch's int4 matmul is 10-30x slower than in
bf16/fp16.
Numerics: in bf16, torch rounds each dequantized weight to bf16 before the product, so the
result is within bf16 tolerance of dequantize + bf16 matmul (tests/test_kernels.py) but not
bit-equal to it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from llmzip.packing import unpack_int32

from . import cpu_dense, cpu_int4_amx, reference

GROUPS = (256, 128, 64, 32)
# Rows of x from which dequantize + matmul beats torch's int4 matmul: about 72 for
# SmolLM2's layers (<= 1.8M weights) and 256 for 4096 x 4096, where dequantizing costs
# relatively more (bench/results/kernels_cpu.md). So: max(DENSE_FROM, weights / 65536).
DENSE_FROM = 72
DENSE_WEIGHTS_PER_ROW = 65536
DEQUANT_BLOCK = reference.CHUNK_ELEMS  # larger weights are dequantized in blocks of rows this size


def dense_from(module) -> int:
    return max(DENSE_FROM, module.out_features * module.in_features // DENSE_WEIGHTS_PER_ROW)


def _op_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def can_implement(spec, device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, "CPU only"
    if getattr(spec, "activations", "fp16") == "fp8":
        return False, "bf16 activations only (FP8 activations are emulated by the reference)"
    if spec.bits != 4:
        return False, f"{spec.bits}-bit codes: torch's CPU int4 matmul reads 4-bit codes only"
    if not _op_available():
        return False, "this torch has no _weight_int4pack_mm_for_cpu"
    group = spec.group_size or next((g for g in GROUPS if spec.in_features % g == 0), None)
    if group not in GROUPS:
        return False, f"group size {spec.group_size or 'per-channel'}: torch's int4 matmul takes groups of 32..256"
    if spec.in_features % 2 or spec.out_features % 16:
        return False, "torch's int4 packing needs even in_features and out_features divisible by 16"
    if cpu_int4_amx.runs(spec.out_features, spec.in_features, spec.group_size or spec.in_features):
        return True, "AMX tile matmul on packed nibbles for bf16 input (cpu_int4_amx); torch int4 matmul for fp16"
    return True, (f"torch int4 matmul on packed nibbles (dequantize + matmul from max({DENSE_FROM}, "
                  f"weights/{DENSE_WEIGHTS_PER_ROW}) rows, or fp32)")


def prepare(module) -> None:
    K, N = module.in_features, module.out_features
    q = unpack_int32(module.weight_packed, 4, K, dim=1)  # int8 [N, K], -8..7
    n_groups = module.weight_scale.shape[1]
    group = K // n_groups
    perm = None
    if getattr(module, "weight_g_idx", None) is not None:
        perm, ragged = reference.act_order_permutation(module.weight_g_idx, group)
        if ragged is not None:  # groups of unequal size: the reference kernel runs it
            module.kernel_cache["cpu_int4"] = None
            return
        q = q[:, perm]
    scale = module.weight_scale.float()  # [N, n_groups]
    zero = getattr(module, "weight_zero_point", None)
    z = torch.zeros_like(scale) if zero is None else unpack_int32(zero, 4, N, dim=0).float()
    dense = None  # per-group (offset 8 + z, scale) [N, groups, 1] for the dense path, when it applies
    if perm is None and sys.byteorder == "little" and K % 8 == 0:
        dense = (z + 8)[..., None], scale[..., None]
    amx = None  # AMX tiles (cpu_int4_amx): bf16 activations, any number of rows
    if cpu_int4_amx.runs(N, K, K // n_groups):
        amx = cpu_int4_amx.prepare((q + 8).to(torch.uint8), scale, z + 8, K // n_groups)
    if n_groups == 1:  # per-channel: the same scale on every group torch accepts
        group = next(g for g in GROUPS if K % g == 0)
        scale, z = scale.expand(N, K // group), z.expand(N, K // group)
    table = torch.stack([scale.t(), (-z * scale).t()], dim=-1).contiguous()  # [groups, N, 2]
    packed = None if amx is not None else _int4pack(q)  # built on first use without AMX (fp16 input)
    module.kernel_cache["cpu_int4"] = {"packed": packed, "group": group, "table": table, "by_dtype": {},
                                       "perm": perm, "dense": dense, "amx": amx}


def _int4pack(q: torch.Tensor) -> torch.Tensor:
    """torch's int4 layout of codes q [N, K] (-8..7)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)


def dense_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype` (bf16/fp16), from the module's packed words (see above)."""
    offset, scale = module.kernel_cache["cpu_int4"]["dense"]  # fp32 [N, groups, 1]
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


def dense_linear(x2: torch.Tensor, module) -> torch.Tensor:
    """The dense path for x2 [M, K] (bf16/fp16): the whole weight dequantized, then one matmul,
    in fp32 where this CPU has no native bf16 matmul (see above)."""
    w = dense_weight(module, x2.dtype)
    if cpu_dense.native_bf16():
        return F.linear(x2, w, module.bias)
    return cpu_dense.fp32_linear(x2, w.float(), module.bias, x2.dtype)


def linear(x: torch.Tensor, module) -> torch.Tensor:
    if "cpu_int4" not in module.kernel_cache:
        prepare(module)
    c = module.kernel_cache["cpu_int4"]
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    if c is None or x.dtype == torch.float32:
        return reference.linear(x, module)
    amx = c["amx"] is not None and x.dtype == torch.bfloat16  # any number of rows
    if not amx and x2.shape[0] >= dense_from(module):
        if c["dense"] is None:
            return reference.linear(x, module)
        y = dense_linear(x2, module)
        return y if x.dim() == 2 else y.reshape(*shape[:-1], module.out_features)
    if c["perm"] is not None:
        x2 = x2[:, c["perm"]]
    if amx:
        y = cpu_int4_amx.linear(x2, c["amx"])
    else:
        if c["packed"] is None:
            c["packed"] = _int4pack(cpu_int4_amx.unpack(c["amx"]["packed"], module.out_features,
                                                        module.in_features).to(torch.int8) - 8)
        table = c["by_dtype"].get(x.dtype)
        if table is None:
            table = c["by_dtype"][x.dtype] = c["table"].to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), c["packed"], c["group"], table)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y if x.dim() == 2 else y.reshape(*shape[:-1], module.out_features)
