"""Triton fused dequantize + matmul for packed integer weights: y = x @ dequant(W)^T.

One kernel serves decode and prefill; the launch configuration differs:
- skinny (M <= 16): BLOCK_M = 16 and split-K, so a handful of rows still spreads over
  every SM; each K slice writes fp32 partial sums that are added at the end;
- tiled (M > 16): larger BLOCK_M x BLOCK_N tiles, no split.
Weights are dequantized in registers (fp32 math, then the activation dtype) and fed to
tl.dot with fp32 accumulation; nothing dense is ever written to memory.

Kernel weight layout (built once per layer by `repack`, kept on the module):
- `qweight` int32 [ceil(K / P), N], P = 32 / S codes per word, slot width S in {2, 4, 8}
  bits (2-bit codes in 2-bit slots, 3- and 4-bit codes in 4-bit slots, 5..8-bit codes in
  8-bit slots). Word [k // P, n] holds the unsigned code u = q + 2^(b-1) of weight
  [n, k] in bits [(k % P) * S, (k % P) * S + S), LSB first. N is the contiguous axis, so
  a tile's loads are coalesced along the output features.
- `scales` [n_groups, N] in the checkpoint's dtype; `zeros` uint8 [n_groups, N] holding
  z + 2^(b-1) (asymmetric only; symmetric uses the constant 2^(b-1)). Then
  w[n, k] = (u - zeros[g, n]) * scales[g, n] with g = k // group_size.
- act-order: K is reordered by g_idx (stable sort) so each group's columns are adjacent;
  `perm` [K] is applied to x's columns at run time. When the groups are not all the same
  size after sorting, `g_idx` [K] (sorted) is read per column instead of k // group_size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llmzip.packing import unpack_int32

from .reference import act_order_permutation

try:  # optional: the kernel registry refuses this kernel without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = tl = None


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


if triton is not None:

    @triton.jit
    def _qmm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
        M, N, K, K_CHUNK,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn,
        stride_os, stride_om, stride_on,
        GROUP: tl.constexpr, SLOT: tl.constexpr, ZERO_CONST: tl.constexpr,
        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, IEEE: tl.constexpr, EMULATE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        PER: tl.constexpr = 32 // SLOT
        MASK: tl.constexpr = (1 << SLOT) - 1
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        k_lo = pid_k * K_CHUNK
        k_hi = tl.minimum(k_lo + K_CHUNK, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_hi
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wk_ok = k_ok[:, None] & n_ok[None, :]
            word = tl.load(w_ptr + (offs_k // PER)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                           mask=wk_ok, other=0)
            u = (word >> ((offs_k % PER) * SLOT)[:, None]) & MASK
            if HAS_GIDX:
                g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
            else:
                g = offs_k // GROUP
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=wk_ok, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=wk_ok, other=0)
                w = (u.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)
            else:
                w = (u.to(tl.float32) - ZERO_CONST) * s.to(tl.float32)
            if EMULATE_BF16:
                # Triton's CPU interpreter mis-converts fp32 -> bf16: round to bf16 by hand
                # (nearest, ties to even) and multiply in fp32, which is what the GPU computes.
                bits = w.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                acc += tl.dot(x.to(tl.float32), bits.to(tl.float32, bitcast=True), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def default_config(M: int, N: int, K: int, device: torch.device) -> Config:
    """A sound configuration without tuning: split-K for skinny M sized to fill the GPU."""
    if M <= 16:
        tiles = -(-N // 64)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        split = max(1, min(-(-2 * sms // tiles), K // 256, 16))
        return Config(16, 64, 128, split, 4, 3)
    if M <= 64:
        return Config(32, 64, 64, 1, 4, 3)
    return Config(64, 128, 32, 1, 4, 3)


def qmm(x: torch.Tensor, r: Repacked, config: Config | None = None) -> torch.Tensor:
    """x [..., K] (fp16, bf16 or fp32) @ dequant(W)^T -> [..., N] in x.dtype."""
    if triton is None:
        raise RuntimeError("the Triton kernel needs the triton package: pip install triton")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if r.perm is not None:
        x2 = x2[:, r.perm]
    M, K = x2.shape
    N = r.out_features
    cfg = config or choose_config(M, N, K, r, x2)
    per_split = -(-K // max(1, cfg.split_k))
    k_chunk = -(-per_split // cfg.block_k) * cfg.block_k  # each K slice a whole number of BLOCK_K
    split = -(-K // k_chunk)
    out = _empty((split, M, N), x.device, x.dtype if split == 1 else torch.float32)
    grid = (-(-M // cfg.block_m), -(-N // cfg.block_n), split)
    zeros = r.zeros if r.zeros is not None else r.scales
    gidx = r.g_idx if r.g_idx is not None else r.scales
    _qmm_kernel[grid](
        x2, r.qweight, r.scales, zeros, gidx, out,
        M, N, K, k_chunk,
        x2.stride(0), x2.stride(1), r.qweight.stride(0), r.qweight.stride(1), r.scales.stride(0), r.scales.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=r.group_size, SLOT=slot_bits(r.bits), ZERO_CONST=float(1 << (r.bits - 1)),
        HAS_ZERO=r.zeros is not None, HAS_GIDX=r.g_idx is not None, IEEE=x.dtype == torch.float32,
        EMULATE_BF16=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    y = out[0] if split == 1 else out.sum(0).to(x.dtype)
    return y.reshape(*shape[:-1], N)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation (tests replace it with a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


def choose_config(M: int, N: int, K: int, r: Repacked, x: torch.Tensor) -> Config:
    if x.device.type == "cuda" and os.environ.get("LLMZIP_AUTOTUNE", "1") != "0":
        from .autotune import tuned_config

        return tuned_config(M, N, K, r, x)
    return default_config(M, N, K, x.device)
