"""torch's own int4 matmul on CPU (`_weight_int4pack_mm_for_cpu`) for 4-bit weights.

torch computes x @ W^T with W[n, k] = (u - 8) * scale[g, n] + zero[g, n] straight from
packed nibbles (u in 0..15, g = k // group), reading 4-bit weights instead of a dense
copy. With our codes (cpu_codes) scale = s and zero = -z * s (0 when symmetric). torch
takes group sizes 32..256; a per-channel scale is replicated over 256/128/64/32-column
groups, which changes nothing numerically.

State (`TorchInt4State`, built once per layer): torch's packed uint8 weight, the
[n_groups, N, 2] (scale, zero) table, one copy of it per activation dtype (made on first
use), and the column permutation or None. Where the AMX kernel holds the codes (cpu_int4
takes bf16 there), torch's packing is built from the AMX layout on the first fp16 call.

Numerics: in bf16, torch rounds each dequantized weight to bf16 before the product, so the
result is within bf16 tolerance of dequantize + bf16 matmul (tests/test_kernels.py) but not
bit-equal to it. Its time grows with the rows (it dequantizes again for every 4 rows of x):
cpu_int4 switches to cpu_int4_dense from `cpu_int4.dense_from` rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import cpu_codes, cpu_int4_amx
from .base import Kernel, LayerSpec
from .cpu_codes import GROUPS, Codes


@dataclass
class TorchInt4State:
    packed: torch.Tensor | None  # torch's int4 layout; None until the first call where `amx` holds the codes
    group: int  # the group size torch is given (per-channel scales: replicated over this many columns)
    table: torch.Tensor  # fp32 [n_groups, N, 2]: (scale, zero)
    perm: torch.Tensor | None  # act-order column order, applied to x
    amx: cpu_int4_amx.AmxState | None = None  # where `packed` comes from on first use
    by_dtype: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # `table` per activation dtype


def int4pack(q: torch.Tensor) -> torch.Tensor:
    """torch's int4 layout of codes q [N, K] (-8..7)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)


def build(codes: Codes, K: int, amx: cpu_int4_amx.AmxState | None = None) -> TorchInt4State:
    """The state from a layer's codes; with `amx`, torch's packing waits for its first use."""
    scale, z, group = codes.scale, codes.z, codes.group
    N = scale.shape[0]
    if scale.shape[1] == 1:  # per-channel: the same scale on every group torch accepts
        group = next(g for g in GROUPS if K % g == 0)
        scale, z = scale.expand(N, K // group), z.expand(N, K // group)
    table = torch.stack([scale.t(), (-z * scale).t()], dim=-1).contiguous()  # [groups, N, 2]
    packed = None if amx is not None else int4pack(codes.q)
    return TorchInt4State(packed, group, table, codes.perm, amx)


def can_implement(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    ok, reason = cpu_codes.can_implement(spec, device)
    return (True, "torch int4 matmul on packed nibbles, any rows") if ok else (False, reason)


def prepare(module) -> TorchInt4State:
    return build(cpu_codes.read_codes(module), module.in_features)


def linear(x: torch.Tensor, module, state: TorchInt4State) -> torch.Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if state.perm is not None:
        x2 = x2[:, state.perm]
    if state.packed is None:
        u = cpu_int4_amx.unpack(state.amx.packed, module.out_features, module.in_features)
        state.packed = int4pack(u.to(torch.int8) - 8)
    table = state.by_dtype.get(x.dtype)
    if table is None:
        table = state.by_dtype[x.dtype] = state.table.to(x.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), state.packed, state.group, table)
    return cpu_codes.apply_bias_and_shape(y, x, module)


ENTRY = Kernel("cpu_int4_torch", can_implement, prepare, linear)
