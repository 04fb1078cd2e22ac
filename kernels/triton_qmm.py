"""Triton fused dequantize + matmul for packed integer weights: y = x @ dequant(W)^T.

Two kernels, chosen per call from the launch configuration:
- GEMV (one activation row, `Config.block_m == 1`): multiply and sum on the CUDA cores,
  split-K so that one row still spreads over every SM (fp32 partial sums added at the end);
- tiled (`tl.dot`, fp32 accumulation): BLOCK_M = 16 with split-K for skinny M, larger
  tiles without split for prefill.
Each packed word is loaded once per tile and its codes unpacked by broadcasting the
shifts. When a K tile lies inside one group (no ragged act-order, group % BLOCK_K == 0)
the tile multiplies the integer codes (exact in fp16/bf16) and scales the partial
product once per output column; otherwise each weight is dequantized (fp32 math, then
the activation dtype) before the product. Nothing dense is ever written to memory.

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
    def _codes(w_ptr, k0, k_hi, offs_n, n_ok, stride_wk, stride_wn,
               SLOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Unsigned codes [BLOCK_K, BLOCK_N] of rows k0.. (k0 a multiple of 32 / SLOT): each packed
        word is loaded once and its codes unpacked by broadcasting the shifts."""
        PER: tl.constexpr = 32 // SLOT
        offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
        word = tl.load(w_ptr + offs_w[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                       mask=(offs_w * PER < k_hi)[:, None] & n_ok[None, :], other=0)
        u = (word[:, None, :] >> (tl.arange(0, PER) * SLOT)[None, :, None]) & ((1 << SLOT) - 1)
        return tl.reshape(u, (BLOCK_K, BLOCK_N))

    @triton.jit
    def _qmm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
        M, N, K, K_CHUNK,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn,
        stride_os, stride_om, stride_on,
        GROUP: tl.constexpr, SLOT: tl.constexpr, ZERO_CONST: tl.constexpr,
        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, TILE_SCALE: tl.constexpr,
        IEEE: tl.constexpr, EMULATE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
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
            u = _codes(w_ptr, k0, k_hi, offs_n, n_ok, stride_wk, stride_wn, SLOT, BLOCK_K, BLOCK_N)
            if TILE_SCALE:
                # The tile lies in one group: multiply the integer codes (exact in any float
                # type), then scale the partial product once per output column.
                g = k0 // GROUP
                s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0)
                    c = u - z.to(tl.int32)[None, :]
                else:
                    c = u - ZERO_CONST
                if IEEE or EMULATE_BF16:  # fp32 activations, or bf16 under the CPU interpreter
                    part = tl.dot(x.to(tl.float32), c.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(x, c.to(x.dtype))
                acc += part * s[None, :]
            else:
                if HAS_GIDX:
                    g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
                else:
                    g = offs_k // GROUP
                wk_ok = k_ok[:, None] & n_ok[None, :]
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

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
        N, K, K_CHUNK,
        stride_xk, stride_wk, stride_wn, stride_sg, stride_sn, stride_os, stride_on,
        GROUP: tl.constexpr, SLOT: tl.constexpr, ZERO_CONST: tl.constexpr, HAS_ZERO: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One activation row (M = 1) on the CUDA cores: multiply and sum over each K tile,
        one scale per tile (GROUP % BLOCK_K == 0), split-K partial sums in fp32."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k_lo = pid_k * K_CHUNK
        k_hi = tl.minimum(k_lo + K_CHUNK, K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < k_hi, other=0.0).to(tl.float32)
            u = _codes(w_ptr, k0, k_hi, offs_n, n_ok, stride_wk, stride_wn, SLOT, BLOCK_K, BLOCK_N)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0)
                c = (u - z.to(tl.int32)[None, :]).to(tl.float32)
            else:
                c = (u - ZERO_CONST).to(tl.float32)
            acc += tl.sum(x[:, None] * c, axis=0) * s
        tl.store(out_ptr + pid_k * stride_os + offs_n * stride_on, acc, mask=n_ok)


@dataclass(frozen=True)
class Config:
    """Launch configuration; block_m == 1 selects the M = 1 GEMV kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def tile_scale(r: Repacked, block_k: int) -> bool:
    """Whether every K tile lies in one group, so scales (and zeros) load once per tile."""
    return r.g_idx is None and r.group_size % block_k == 0


def _split(N: int, K: int, block_n: int, device: torch.device) -> int:
    """K slices for skinny M, enough for about two programs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(-(-2 * sms // -(-N // block_n)), K // 256, 16))


def default_config(M: int, N: int, K: int, device: torch.device, r: Repacked | None = None) -> Config:
    """A sound configuration without tuning: the largest K tile that stays inside a group,
    the GEMV kernel for one row, split-K for skinny M."""
    group = r.group_size if r is not None else K
    ragged = r is not None and r.g_idx is not None
    bk = 64 if ragged else next((b for b in (128, 64, 32) if group % b == 0), 64)
    if M == 1 and not ragged and group % bk == 0:
        return Config(1, 128, bk, _split(N, K, 128, device), 4, 2)
    if M <= 16:
        return Config(16, 64, bk, _split(N, K, 64, device), 4, 3)
    if M <= 64:
        return Config(32, 64, min(bk, 64), 1, 4, 3)
    return Config(64, 128, min(bk, 64), 1, 4, 3)


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
    tile = tile_scale(r, cfg.block_k)
    gemv = cfg.block_m == 1 and M == 1 and tile
    block_m = 16 if cfg.block_m == 1 and not gemv else cfg.block_m
    per_split = -(-K // max(1, cfg.split_k))
    k_chunk = -(-per_split // cfg.block_k) * cfg.block_k  # each K slice a whole number of BLOCK_K
    split = -(-K // k_chunk)
    out = _empty((split, M, N), x.device, x.dtype if split == 1 and not gemv else torch.float32)
    zeros = r.zeros if r.zeros is not None else r.scales
    common = dict(GROUP=r.group_size, SLOT=slot_bits(r.bits), ZERO_CONST=1 << (r.bits - 1),
                  HAS_ZERO=r.zeros is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if gemv:
        _gemv_kernel[(-(-N // cfg.block_n), split)](
            x2, r.qweight, r.scales, zeros, out, N, K, k_chunk,
            x2.stride(1), r.qweight.stride(0), r.qweight.stride(1), r.scales.stride(0), r.scales.stride(1),
            out.stride(0), out.stride(2), **common)
    else:
        gidx = r.g_idx if r.g_idx is not None else r.scales
        _qmm_kernel[(-(-M // block_m), -(-N // cfg.block_n), split)](
            x2, r.qweight, r.scales, zeros, gidx, out,
            M, N, K, k_chunk,
            x2.stride(0), x2.stride(1), r.qweight.stride(0), r.qweight.stride(1), r.scales.stride(0),
            r.scales.stride(1), out.stride(0), out.stride(1), out.stride(2),
            HAS_GIDX=r.g_idx is not None, TILE_SCALE=tile, IEEE=x.dtype == torch.float32,
            EMULATE_BF16=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
            BLOCK_M=block_m, **common)
    y = out[0] if split == 1 and not gemv else out.sum(0).to(x.dtype)
    return y.reshape(*shape[:-1], N)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation (tests replace it with a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


def choose_config(M: int, N: int, K: int, r: Repacked, x: torch.Tensor) -> Config:
    if x.device.type == "cuda" and os.environ.get("LLMZIP_AUTOTUNE", "1") != "0":
        from .autotune import tuned_config

        return tuned_config(M, N, K, r, x)
    return default_config(M, N, K, x.device, r)
