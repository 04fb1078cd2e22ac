"""Dequantize a whole packed weight into a reused dense buffer, then a dense matmul.

For prefill-size M the fused kernel's per-tile dequantization costs more than reading the
dense weight once: one Triton pass writes W [K, N] (fp16/bf16, from the kernel layout of
`triton_qmm.repack`, fp32 math as the reference) into a buffer shared by every layer on the
device, and cuBLAS multiplies. The W4A8 path uses the same pass to write the zero-free
integer codes as e4m3 (exact) for the FP8 tile kernel. The buffer is reused call after call
(one stream: calls on one device are ordered), so memory stays at the largest layer's size.
"""

from __future__ import annotations

import os

import torch

from .triton_layout import Repacked, slot_bits
from .triton_qmm import round_bf16, triton, unpack_codes

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K,
                        stride_wk, stride_wn, stride_sg, stride_sn, stride_ok, stride_on,
                        GROUP: tl.constexpr, SLOT: tl.constexpr, ZERO_CONST: tl.constexpr,
                        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, CODES: tl.constexpr, OUT_F32: tl.constexpr,
                        EMULATE_BF16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """CODES: write u - zero (as e4m3, or fp32 under the interpreter); else (u - zero) * scale."""
        k0 = tl.program_id(0) * BLOCK_K
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        ok = (offs_k < K)[:, None] & n_ok[None, :]
        u = unpack_codes(w_ptr, k0, K, offs_n, n_ok, stride_wk, stride_wn, SLOT, BLOCK_K, BLOCK_N)
        if HAS_GIDX:
            g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
        else:
            g = offs_k // GROUP
        if HAS_ZERO:
            z = tl.load(z_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=ok, other=0)
            c = u.to(tl.float32) - z.to(tl.float32)
        else:
            c = u.to(tl.float32) - ZERO_CONST
        dst = out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
        if CODES:
            if OUT_F32:
                tl.store(dst, c, mask=ok)
            else:
                tl.store(dst, c.to(tl.float16).to(out_ptr.dtype.element_ty), mask=ok)
        else:
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=ok, other=0.0)
            w = c * s.to(tl.float32)
            if EMULATE_BF16:
                w = round_bf16(w)
            tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=ok)


_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _buffer(K: int, N: int, device: torch.device, dtype: torch.dtype, k_major: bool = False) -> torch.Tensor:
    """A [K, N] view of the device's reused buffer for `dtype`, grown when a layer needs more;
    k_major: K is the contiguous axis (the FP8 tensor cores read B K-major)."""
    buf = _BUFFERS.get((device, dtype))
    if buf is None or buf.numel() < K * N:
        buf = _BUFFERS[(device, dtype)] = torch.empty(K * N, device=device, dtype=dtype)
    return buf[: K * N].view(N, K).t() if k_major else buf[: K * N].view(K, N)


def dequantize(r: Repacked, dtype: torch.dtype, codes: bool = False, out: torch.Tensor | None = None,
               k_major: bool = False) -> torch.Tensor:
    """The weight (codes=False) or its zero-free codes (codes=True) as a dense [K, N] tensor
    in `dtype`, in the kernel's K order (act-order: permuted like `r.perm`); by default in
    the reused buffer (k_major: stored with K contiguous)."""
    K, N = r.in_features, r.out_features
    out = _buffer(K, N, r.qweight.device, dtype, k_major) if out is None else out
    zeros = r.zeros if r.zeros is not None else r.scales
    gidx = r.g_idx if r.g_idx is not None else r.scales
    bk, bn = 64, 128
    _dequant_kernel[(-(-K // bk), -(-N // bn))](
        r.qweight, r.scales, zeros, gidx, out, N, K, r.qweight.stride(0), r.qweight.stride(1),
        r.scales.stride(0), r.scales.stride(1), out.stride(0), out.stride(1),
        GROUP=r.group_size, SLOT=slot_bits(r.bits), ZERO_CONST=1 << (r.bits - 1), HAS_ZERO=r.zeros is not None,
        HAS_GIDX=r.g_idx is not None, CODES=codes, OUT_F32=dtype == torch.float32,
        EMULATE_BF16=dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_K=bk, BLOCK_N=bn, num_warps=4)
    return out


def dense_matmul(x2: torch.Tensor, r: Repacked) -> torch.Tensor:
    """x2 [M, K] (columns already in the kernel's order) @ W -> [M, N], W dequantized into
    the reused buffer, then torch.matmul (cuBLAS on CUDA)."""
    return torch.matmul(x2, dequantize(r, x2.dtype))


def dense_codes(r: Repacked, emulate: bool = False) -> torch.Tensor:
    """The zero-free codes [K, N] as e4m3, K contiguous (fp32 holding the same integers when
    `emulate`)."""
    return dequantize(r, torch.float32 if emulate else torch.float8_e4m3fn, codes=True, k_major=True)
