"""What the CPU 4-bit kernels (cpu_int4_amx, cpu_int4_torch, cpu_int4_dense and cpu_int4,
which switches between them by rows) share: the checks every one of them makes on a
layer, and its codes read once from the packed tensors.

Our codes map onto torch's int4 convention exactly: u = q + 8 (0..15) and
w = (q - z) * s = (u - (z + 8)) * s. act-order: K is reordered by g_idx (the stable
permutation of reference.act_order_permutation), and x's columns follow at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmzip.packing import unpack_int32

from . import reference
from .base import LayerSpec, Unsupported

GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 matmul takes


def op_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def can_implement(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    """The checks every CPU 4-bit kernel makes; (True, "") when they all pass."""
    if device.type != "cpu":
        return False, "CPU only"
    if spec.activations == "fp8":
        return False, "bf16 activations only (FP8 activations are emulated by the reference)"
    if spec.bits != 4:
        return False, f"{spec.bits}-bit codes: torch's CPU int4 matmul reads 4-bit codes only"
    if not op_available():
        return False, "this torch has no _weight_int4pack_mm_for_cpu"
    group = spec.group_size or next((g for g in GROUPS if spec.in_features % g == 0), None)
    if group not in GROUPS:
        return False, f"group size {spec.group_size or 'per-channel'}: torch's int4 matmul takes groups of 32..256"
    if spec.in_features % 2 or spec.out_features % 16:
        return False, "torch's int4 packing needs even in_features and out_features divisible by 16"
    return True, ""


@dataclass(frozen=True)
class Codes:
    """A layer's codes, read once: q int8 [N, K] (-8..7, columns in `perm` order), scale and
    zero point z fp32 [N, n_groups] (z = 0 when symmetric), group = K / n_groups."""

    q: torch.Tensor
    scale: torch.Tensor
    z: torch.Tensor
    perm: torch.Tensor | None
    group: int


def read_codes(module) -> Codes:
    K, N = module.in_features, module.out_features
    q = unpack_int32(module.weight_packed, 4, K, dim=1)  # int8 [N, K], -8..7
    n_groups = module.weight_scale.shape[1]
    group = K // n_groups
    perm = None
    if getattr(module, "weight_g_idx", None) is not None:
        perm, ragged = reference.act_order_permutation(module.weight_g_idx, group)
        if ragged is not None:
            raise Unsupported("act-order groups of unequal size: the CPU int4 kernels need equal groups")
        q = q[:, perm]
    scale = module.weight_scale.float()  # [N, n_groups]
    zero = getattr(module, "weight_zero_point", None)
    z = torch.zeros_like(scale) if zero is None else unpack_int32(zero, 4, N, dim=0).float()
    return Codes(q, scale, z, perm, group)


def apply_bias_and_shape(y: torch.Tensor, x: torch.Tensor, module) -> torch.Tensor:
    """y [M, N] for x [..., K]: the layer's bias added, reshaped to [..., N]."""
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], module.out_features)
