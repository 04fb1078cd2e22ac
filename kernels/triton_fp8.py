"""Per-token FP8 (e4m3) activation quantization for the W4A8 path, and its torch references.

Each row of x [M, K] gets one fp32 scale s = max|x_row| / 448 (e4m3's largest finite value)
and q = e4m3(x / s), rounded to nearest, ties to even. One Triton program per row: a pass
for the row's absolute maximum, a pass to scale, round and store (the row stays in cache).
Under Triton's CPU interpreter (which mis-converts to fp8) the kernel rounds to e4m3 by
hand and stores the same values in fp32, so the interpreter tests check the GPU's math.

`fake_quantize_rows` is the CPU emulation of the whole W4A8 numerics used by the reference
kernel and the perplexity measurement: x -> e4m3 per row -> back to x's dtype.
"""

from __future__ import annotations

import torch

try:  # optional, as in triton_qmm
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

E4M3_MAX = 448.0
MIN_SCALE = 1e-12  # an all-zero row gets this scale (its codes are all zero anyway)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q float8_e4m3fn [M, K], scale fp32 [M]) with x ~= q * scale[:, None]."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / E4M3_MAX).clamp_min(MIN_SCALE)
    q = (xf / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] with each row rounded through per-token e4m3, in x's dtype (CPU emulation)."""
    shape = x.shape
    q, scale = quantize_rows_reference(x.reshape(-1, shape[-1]))
    return (q.float() * scale[:, None]).to(x.dtype).reshape(shape)


def w4a8_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = (e4m3(x) * s_x) @ W^T in fp32, cast to x's dtype: what the W4A8 kernel computes
    (weight: the dequantized [N, K] weight, whose codes the kernel multiplies exactly)."""
    q, scale = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
    y = (q.float() @ weight.float().t()) * scale[:, None]
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


if triton is not None:

    @triton.jit
    def round_e4m3(v):
        """fp32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), kept in fp32."""
        bits = v.to(tl.uint32, bitcast=True)
        e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
        step_e = tl.maximum(e, -6) - 3  # 3 mantissa bits; subnormals below 2^-6 step by 2^-9
        step = ((step_e + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
        r = v / step  # a power of two: exact
        r = (r + 12582912.0) - 12582912.0  # round to an integer, ties to even (|r| < 2^22)
        return r * step

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                           EMULATE: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
            if EMULATE:
                tl.store(q_ptr + row * stride_qm + offs, round_e4m3(v), mask=offs < K)
            else:
                tl.store(q_ptr + row * stride_qm + offs, v.to(tl.float8e4nv), mask=offs < K)
        tl.store(s_ptr + row, scale)


def quantize_rows(x: torch.Tensor, emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token quantization: x [M, K] -> (q [M, K] e4m3, or fp32 holding e4m3 values
    when `emulate`; scale fp32 [M])."""
    if triton is None:
        raise RuntimeError("FP8 activations need the triton package: pip install triton")
    M, K = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(M, K, device=x.device, dtype=torch.float32 if emulate else torch.float8_e4m3fn)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(K), 1024 if emulate else 4096)
    _quant_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), EMULATE=emulate, BLOCK_K=block,
                             num_warps=4 if block <= 1024 else 8)
    return q, scale


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    if device.type != "cuda":
        return False, f"FP8 tensor cores are on CUDA GPUs, not {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"FP8 tensor cores need compute capability 8.9+, this GPU has {cap[0]}.{cap[1]}"
    return True, "FP8 tensor cores"
