"""Triton fused dequantize + matmul for packed integer weights: y = x @ dequant(W)^T.

Two kernels, chosen per call from the launch configuration:
- GEMV (one activation row, `Config.block_m == 1`): multiply and sum on the CUDA cores,
  split-K so that one row still spreads over every SM (fp32 partial sums added at the end);
- tiled (`tl.dot`, fp32 accumulation): BLOCK_M = 16 with split-K for skinny M, larger
  tiles without split for prefill;
- `Config.path == "dequant"` (prefill-size M): the whole weight dequantized into a reused
  buffer, then cuBLAS (`triton_dequant`).
Split-K partials are either summed by torch afterwards or reduced inside the kernel
(`reduce="atomic"`: fp32 atomics into a zero-at-rest workspace; the last K slice of each
tile casts and stores). activations="fp8" (W4A8): x is quantized per token to e4m3 by a
fused kernel (`triton_fp8`), the codes are cast to e4m3 (exact) and the tile kernel runs
on the FP8 tensor cores, one group scale per K tile and the token scale at the end.
Each packed word is loaded once per tile and its codes unpacked by broadcasting the
shifts. When a K tile lies inside one group (no ragged act-order, group % BLOCK_K == 0)
the tile multiplies the integer codes (exact in fp16/bf16) and scales the partial
product once per output column; otherwise each weight is dequantized (fp32 math, then
the activation dtype) before the product. Nothing dense is ever written to memory.

Kernel weight layout (built once per layer by `triton_layout.repack`, kept in its TritonState):
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

import torch

from . import autotune
from .triton_layout import (DEQUANT_MIN_M, PATHS, REDUCES, Config, Repacked, default_config, repack,  # noqa: F401
                            slot_bits, tile_scale)

try:  # optional: the kernel registry refuses this kernel without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = tl = None


if triton is not None:

    @triton.jit
    def round_bf16(w):
        """fp32 -> the nearest bf16 value (ties to even), kept in fp32: what the GPU's cast
        computes, for Triton's CPU interpreter, which mis-converts fp32 -> bf16."""
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def reduce_split_k(acc, out, ws, cnt_ptr, tile, splits, mask):
        """Split-K reduced inside the kernel: each K slice adds its fp32 partial into the
        workspace (zero at rest); the last slice to arrive for this output tile takes the
        sum (resetting the workspace to zero), casts it and writes the output, then resets
        the tile's arrival counter. One launch, no separate sum and cast."""
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before the arrival is counted
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.atomic_add(ws, tl.zeros_like(acc), mask=mask, sem="relaxed")  # read at L2
            tl.store(ws, tl.zeros_like(acc), mask=mask)
            tl.store(out, total.to(out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")

    @triton.jit
    def unpack_codes(w_ptr, k0, k_hi, offs_n, n_ok, stride_wk, stride_wn,
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
        x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, K_CHUNK,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn,
        stride_os, stride_om, stride_on,
        GROUP: tl.constexpr, SLOT: tl.constexpr, ZERO_CONST: tl.constexpr,
        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, TILE_SCALE: tl.constexpr,
        IEEE: tl.constexpr, EMULATE_BF16: tl.constexpr, X_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
        DENSE_CODES: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """X_FP8: x holds e4m3 activations with one scale per row in xs_ptr (W4A8): the codes
        are cast to e4m3 (exact) and multiplied on the FP8 tensor cores (EMULATE_FP8: x holds
        the same e4m3 values in fp32 and the product runs in fp32, for the CPU interpreter).
        DENSE_CODES: w_ptr is a dense [K, N] buffer of zero-free codes (already e4m3)."""
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
            if TILE_SCALE:
                # The tile lies in one group: multiply the integer codes (exact in any float
                # type, e4m3 included), then scale the partial product once per output column.
                g = k0 // GROUP
                s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
                if DENSE_CODES:
                    c = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                else:
                    u = unpack_codes(w_ptr, k0, k_hi, offs_n, n_ok, stride_wk, stride_wn, SLOT, BLOCK_K, BLOCK_N)
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0)
                        c = u - z.to(tl.int32)[None, :]
                    else:
                        c = u - ZERO_CONST
                if IEEE or EMULATE_BF16 or EMULATE_FP8:  # fp32, or bf16/e4m3 under the CPU interpreter
                    part = tl.dot(x.to(tl.float32), c.to(tl.float32), input_precision="ieee")
                elif X_FP8:
                    if DENSE_CODES:
                        part = tl.dot(x, c)
                    else:
                        part = tl.dot(x, c.to(tl.float16).to(tl.float8e4nv))
                else:
                    part = tl.dot(x, c.to(x.dtype))
                acc += part * s[None, :]
            else:
                u = unpack_codes(w_ptr, k0, k_hi, offs_n, n_ok, stride_wk, stride_wn, SLOT, BLOCK_K, BLOCK_N)
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
                    acc += tl.dot(x.to(tl.float32), round_bf16(w), input_precision="ieee")
                elif IEEE:
                    acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
                else:
                    acc += tl.dot(x, w.to(x.dtype))
        if X_FP8:
            acc = acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
        mask = m_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
            reduce_split_k(acc, out, ws_ptr + offs_m[:, None] * N + offs_n[None, :], cnt_ptr,
                           pid_m * tl.num_programs(1) + pid_n, tl.num_programs(2), mask)
        else:
            out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr,
        N, K, K_CHUNK,
        stride_xk, stride_wk, stride_wn, stride_sg, stride_sn, stride_os, stride_on,
        GROUP: tl.constexpr, SLOT: tl.constexpr, ZERO_CONST: tl.constexpr, HAS_ZERO: tl.constexpr,
        ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
            u = unpack_codes(w_ptr, k0, k_hi, offs_n, n_ok, stride_wk, stride_wn, SLOT, BLOCK_K, BLOCK_N)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0)
                c = (u - z.to(tl.int32)[None, :]).to(tl.float32)
            else:
                c = (u - ZERO_CONST).to(tl.float32)
            acc += tl.sum(x[:, None] * c, axis=0) * s
        if ATOMIC:
            reduce_split_k(acc, out_ptr + offs_n * stride_on, ws_ptr + offs_n, cnt_ptr, pid_n, tl.num_programs(1),
                           n_ok)
        else:
            tl.store(out_ptr + pid_k * stride_os + offs_n * stride_on, acc, mask=n_ok)


def qmm(x: torch.Tensor, r: Repacked, config: Config | None = None, activations: str = "fp16") -> torch.Tensor:
    """x [..., K] (fp16, bf16 or fp32) @ dequant(W)^T -> [..., N] in x.dtype.
    activations "fp8": x is quantized per row to e4m3 first (W4A8, `triton_fp8`)."""
    if triton is None:
        raise RuntimeError("the Triton kernel needs the triton package: pip install triton")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if r.perm is not None:
        x2 = x2[:, r.perm]
    M, K = x2.shape
    N = r.out_features
    cfg = config or choose_config(M, N, K, r, x2, activations)
    fp8 = activations == "fp8"
    if cfg.path == "dequant" and not fp8:
        from .triton_dequant import dense_matmul

        return dense_matmul(x2, r).reshape(*shape[:-1], N)
    tile = tile_scale(r, cfg.block_k)
    if fp8 and not tile:
        raise ValueError(f"W4A8 needs K tiles inside one group: block_k {cfg.block_k}, group {r.group_size}, "
                         f"act-order groups {'ragged' if r.g_idx is not None else 'none'}")
    gemv = cfg.block_m == 1 and M == 1 and tile and not fp8
    block_m = 16 if cfg.block_m == 1 and not gemv else cfg.block_m
    per_split = -(-K // max(1, cfg.split_k))
    k_chunk = -(-per_split // cfg.block_k) * cfg.block_k  # each K slice a whole number of BLOCK_K
    split = -(-K // k_chunk)
    grid = (-(-N // cfg.block_n), split) if gemv else (-(-M // block_m), -(-N // cfg.block_n), split)
    ws = cnt = None
    if split > 1 and cfg.reduce == "atomic":
        ws, cnt = _workspace(M * N, grid[0] if gemv else grid[0] * grid[1], x.device)
    atomic = ws is not None
    if split == 1 or atomic:
        out = _empty((1, M, N), x.device, x.dtype)
    else:
        out = _empty((split, M, N), x.device, torch.float32)
    ws, cnt = (ws, cnt) if atomic else (out, out)
    zeros = r.zeros if r.zeros is not None else r.scales
    common = dict(GROUP=r.group_size, SLOT=slot_bits(r.bits), ZERO_CONST=1 << (r.bits - 1),
                  HAS_ZERO=r.zeros is not None, ATOMIC=atomic, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if gemv:
        if split == 1 and not atomic:
            out = _empty((1, M, N), x.device, torch.float32)
        _gemv_kernel[grid](
            x2, r.qweight, r.scales, zeros, out, ws, cnt, N, K, k_chunk,
            x2.stride(1), r.qweight.stride(0), r.qweight.stride(1), r.scales.stride(0), r.scales.stride(1),
            out.stride(0), out.stride(2), **common)
        y = out[0] if atomic else out.sum(0).to(x.dtype)
        return y.reshape(*shape[:-1], N)
    xs = w = None
    if fp8:
        from .triton_fp8 import quantize_rows

        x2, xs = quantize_rows(x2, emulate=interp)
    if fp8 and cfg.path == "dequant":
        from .triton_dequant import dense_codes

        w = dense_codes(r, emulate=interp)
    gidx = r.g_idx if r.g_idx is not None else r.scales
    wq = r.qweight if w is None else w
    _qmm_kernel[grid](
        x2, xs if fp8 else r.scales, wq, r.scales, zeros, gidx, out, ws, cnt,
        M, N, K, k_chunk,
        x2.stride(0), x2.stride(1), wq.stride(0), wq.stride(1), r.scales.stride(0),
        r.scales.stride(1), out.stride(0), out.stride(1), out.stride(2),
        HAS_GIDX=r.g_idx is not None, TILE_SCALE=tile, IEEE=x.dtype == torch.float32 and not fp8,
        EMULATE_BF16=x.dtype == torch.bfloat16 and interp and not fp8, X_FP8=fp8, EMULATE_FP8=fp8 and interp,
        DENSE_CODES=w is not None, BLOCK_M=block_m, **common)
    y = out[0] if split == 1 or atomic else out.sum(0).to(x.dtype)
    return y.reshape(*shape[:-1], N)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation (tests replace it with a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(elems: int, tiles: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The in-kernel split-K reduction's fp32 workspace and per-tile arrival counters, zero at
    rest (the kernel resets what it used), shared by every call on the device (one stream).
    (None, None) while a CUDA graph is being captured and the workspace would have to grow:
    the caller then sums the partials instead."""
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < elems or cnt.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None, None
        ws = torch.zeros(max(elems, 0 if ws is None else ws.numel()), device=device, dtype=torch.float32)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), device=device, dtype=torch.int32)
        _WORKSPACE[device] = ws, cnt
    return ws, cnt


def choose_config(M: int, N: int, K: int, r: Repacked, x: torch.Tensor, activations: str = "fp16") -> Config:
    if x.device.type == "cuda" and os.environ.get("LLMZIP_AUTOTUNE", "1") != "0":
        return autotune.tuned_config(M, N, K, r, x, activations, run=qmm)
    return default_config(M, N, K, x.device, r, activations)
