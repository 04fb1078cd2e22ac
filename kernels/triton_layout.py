"""The Triton quantized matmul's weight layout (`repack`) and launch configurations
(`Config`, `default_config`), in plain torch: read by the kernels (triton_qmm,
triton_dequant) and by the autotuner (autotune), which therefore do not import each other
for them. The layout is described in triton_qmm's docstring."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmzip.packing import unpack_int32

from .reference import act_order_permutation


def slot_bits(bits: int) -> int:
    return 2 if bits == 2 else 4 if bits <= 4 else 8


@dataclass
class Repacked:
    """A layer's weight in the kernel layout (see module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int


def repack(module) -> Repacked:
    """QuantLinear checkpoint tensors -> kernel layout, on the module's device."""
    bits, K, N = module.bits, module.in_features, module.out_features
    q = unpack_int32(module.weight_packed, bits, K, dim=1)  # int8 [N, K] signed
    n_groups = module.weight_scale.shape[1]
    group = K // n_groups
    offset = 1 << (bits - 1)
    perm = g_idx = None
    zero = getattr(module, "weight_zero_point", None)
    zeros = None
    if zero is not None:
        z = unpack_int32(zero, bits, N, dim=0)  # int8 [N, n_groups]
        zeros = (z.to(torch.int16) + offset).to(torch.uint8).t().contiguous()
    if getattr(module, "weight_g_idx", None) is not None:
        perm, g_idx = act_order_permutation(module.weight_g_idx, group)
        q = q[:, perm]
    S = slot_bits(bits)
    P = 32 // S
    words = -(-K // P)
    u = (q.to(torch.int64) + offset).t()  # [K, N], in [0, 2^b)
    u = torch.cat([u, u.new_zeros(words * P - K, N)]) if words * P != K else u
    shifts = (torch.arange(P, device=u.device, dtype=torch.int64) * S).view(1, P, 1)
    packed = (u.reshape(words, P, N) << shifts).sum(1)
    packed = torch.where(packed >= (1 << 31), packed - (1 << 32), packed).to(torch.int32).contiguous()
    return Repacked(packed, module.weight_scale.t().contiguous(), zeros, perm, g_idx, bits, group, K, N)


PATHS = ("fused", "dequant")  # fused dequantize + matmul; dequantize into a reused buffer, then a dense matmul
REDUCES = ("sum", "atomic")  # split-K: partials summed by torch afterwards, or inside the kernel


@dataclass(frozen=True)
class Config:
    """Launch configuration; block_m == 1 selects the M = 1 GEMV kernel. `reduce` says how
    split-K partials are added; `path` "dequant" dequantizes the whole weight into a
    reused buffer first (for prefill-size M: cuBLAS, or the FP8 tile kernel on e4m3 codes)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    reduce: str = "sum"
    path: str = "fused"

    def __post_init__(self):
        if self.reduce not in REDUCES or self.path not in PATHS:
            raise ValueError(f"Config: reduce must be one of {REDUCES} and path one of {PATHS}, "
                             f"not {self.reduce!r} / {self.path!r}")


def tile_scale(r: Repacked, block_k: int) -> bool:
    """Whether every K tile lies in one group, so scales (and zeros) load once per tile."""
    return r.g_idx is None and r.group_size % block_k == 0


def _split(N: int, K: int, block_n: int, device: torch.device) -> int:
    """K slices for skinny M, enough for about two programs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(-(-2 * sms // -(-N // block_n)), K // 256, 16))


DEQUANT_MIN_M = 256  # without tuning, M at and above this dequantizes into a buffer and runs a dense matmul


def default_config(M: int, N: int, K: int, device: torch.device, r: Repacked | None = None,
                   activations: str = "fp16") -> Config:
    """A sound configuration without tuning: the largest K tile that stays inside a group,
    the GEMV kernel for one row, split-K for skinny M, a dense matmul for prefill-size M."""
    group = r.group_size if r is not None else K
    ragged = r is not None and r.g_idx is not None
    bk = 64 if ragged else next((b for b in (128, 64, 32) if group % b == 0), 64)
    if activations == "fp8":  # W4A8: the tile kernel, one group scale per K tile
        if M <= 16:
            return Config(16, 64, bk, _split(N, K, 64, device), 4, 3)
        if M < DEQUANT_MIN_M:
            return Config(64, 128, bk, 1, 4, 3)
        return Config(128, 128, bk, 1, 8, 3, path="dequant")
    if M == 1 and not ragged and group % bk == 0:
        return Config(1, 128, bk, _split(N, K, 128, device), 4, 2)
    if M <= 16:
        return Config(16, 64, bk, _split(N, K, 64, device), 4, 3)
    if M <= 64:
        return Config(32, 64, min(bk, 64), 1, 4, 3)
    if M >= DEQUANT_MIN_M:
        return Config(32, 128, 128, path="dequant")
    return Config(64, 128, min(bk, 64), 1, 4, 3)
