"""Integer quantization primitives: pure functions on tensors.

Conventions (shared with the compressed-tensors format):
- weight w: [out, in], float. Groups run along `in`: group j covers columns
  [j*G, (j+1)*G). Per-channel is one group of width `in`.
- scale: [out, n_groups] in the storage dtype (the model dtype); all rounding is done
  against the scale *as stored*, so dequantization of the checkpoint is exact.
  Symmetric scales may be negative (signed_qparams): the grid [qmin, qmax] * scale then
  reaches further on the positive side. Every consumer only multiplies by the scale.
- zero: [out, n_groups] int8 in [qmin, qmax] (asymmetric only), else None.
- q: [out, in] int8 signed codes in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1].
- dequant: (q - zero) * scale (zero = 0 when symmetric).
"""

from __future__ import annotations

import torch

from .config import ClipSearch, WeightScheme

# Hessian-weighted clip searches over at least this many columns screen in bf16 on CPU
# (below it the GEMMs are too small for bf16 to pay for its conversions).
BF16_SCREEN_MIN = 256
# A clip search scores its candidates together, this many error elements at a time.
SEARCH_CHUNK_ELEMS = 1 << 22


def _grouped(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """[out, in] -> [out, n_groups, G] view in fp32."""
    out_f, in_f = w.shape
    g = in_f if scheme.group_size is None else scheme.group_size
    return w.float().reshape(out_f, in_f // g, g)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) that map [lo, hi] onto the integer grid without clipping.

    lo, hi: [...] per-group range (fp32). The range is widened to include 0, so 0.0
    is always exactly representable. Symmetric uses the sign that needs the larger
    scale (positive values map to qmax, negative to qmin), so no value ever clips.
    Returns scale in `scale_dtype` (never 0) and zero as int8 or None.
    """
    lo = torch.clamp(lo.float(), max=0.0)  # half-precision ranges: fp32 math, the same on every device
    hi = torch.clamp(hi.float(), min=0.0)
    tiny = torch.finfo(scale_dtype).tiny * 16
    if scheme.symmetric:
        scale = torch.maximum(_div(hi, scheme.qmax), _div(lo, scheme.qmin))
        scale = round_up_to_dtype(scale.clamp(min=tiny), scale_dtype)
        return scale, None
    span = (1 << scheme.bits) - 1
    scale = round_up_to_dtype(_div(hi - lo, span).clamp(min=tiny), scale_dtype)
    s = scale.float()
    zero = torch.round(scheme.qmin - lo / s).clamp(scheme.qmin, scheme.qmax)
    return scale, zero.to(torch.int8)


def _div(x: torch.Tensor, n: int) -> torch.Tensor:
    """x / n, correctly rounded on every device. CUDA turns a division by a Python number
    into a multiplication by its reciprocal, one fp32 ulp off for most x (measured on an
    H200: 71% of W4 g128 ranges / 15); where the quotient is a bf16 value that ulp decides
    whether the stored scale steps up, so CPU and GPU checkpoints differed in 5.7% of scales."""
    return x / torch.tensor(float(n), dtype=x.dtype, device=x.device)


def round_up_to_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast the scale to its storage dtype, stepping one ulp away from zero where the cast
    shrank its magnitude, so the stored scale still covers [lo, hi] (a bf16 cast can shrink
    it by 0.4%). Negative scales (signed_qparams) keep their sign."""
    stored = scale.to(dtype)
    too_small = stored.float().abs() < scale.abs()
    if too_small.any():
        away = torch.where(scale < 0, float("-inf"), float("inf")).to(stored.dtype)
        up = torch.nextafter(stored, away)
        stored = torch.where(too_small, up, stored)
    return stored


def signed_qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scale that maps the range's larger-magnitude end onto qmin, the grid's
    longer side: negative where that end is positive. All 2^b levels then cover the
    extreme's side (step |extreme| / 2^(b-1) instead of / (2^(b-1) - 1) when the extreme
    is positive: 8/7 finer at 4 bits, 2x at 2 bits), as llama.cpp's Q4_0 does; values of
    the other sign beyond qmax * |scale| clip by less than one step.
    """
    lo, hi = torch.clamp(lo.float(), max=0.0), torch.clamp(hi.float(), min=0.0)
    flip = hi > -lo  # the positive end is the larger: mirror the range, then negate the scale
    scale, _ = qparams_from_range(torch.where(flip, -hi, lo), torch.zeros_like(hi), scheme, scale_dtype)
    return torch.where(flip, -scale, scale)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme
) -> torch.Tensor:
    """Round w [out, in] to int8 codes [out, in] with the given per-group params."""
    wg = _grouped(w, scheme)
    s = scale.float().unsqueeze(-1)
    q = torch.round(wg / s)
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    q = q.clamp(scheme.qmin, scheme.qmax)
    return q.to(torch.int8).reshape(w.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int | None,
    dtype: torch.dtype | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes [out, in] -> weights [out, in] in `dtype` (default: scale's dtype).

    g_idx: [in] group of each column (act-order with dynamic groups); when given,
    group_size is not used. The arithmetic runs in fp32 and is cast once at the end.
    """
    if g_idx is not None:
        g = g_idx.long()
        qf = q.float() if zero is None else q.float() - zero.float()[:, g]
        return (qf * scale.float()[:, g]).to(dtype or scale.dtype)
    out_f, in_f = q.shape
    g = in_f if group_size is None else group_size
    qf = q.float().reshape(out_f, in_f // g, g)
    if zero is not None:
        qf = qf - zero.float().unsqueeze(-1)
    w = (qf * scale.float().unsqueeze(-1)).reshape(out_f, in_f)
    return w.to(dtype or scale.dtype)


def minmax_qparams(w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype):
    """Per-group min/max range -> (scale, zero)."""
    wg = _grouped(w, scheme)
    return qparams_from_range(wg.amin(-1), wg.amax(-1), scheme, scale_dtype)


def mse_clip_qparams(
    w: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype,
    clip: ClipSearch,
    hessian: torch.Tensor | None = None,
):
    """Per group, shrink the min/max range by each ratio of `clip` (symmetric schemes:
    also with the sign-flipped grid, clip.signed) and keep the one with the lowest error;
    symmetric schemes then refit that scale by least squares for its codes (clip.refit
    rounds, each kept only where it lowers the error). Ratio 1.0 is always tried, so the
    result is never worse than `minmax_qparams` on that objective.

    The error is sum |w - dq(q(w))|^norm over the group, or, with `hessian` [in, in]
    (one group spanning all of w's columns), the layer-output error e H e^T of each
    row e = w - dq: clipping then spares the columns that see large inputs.

    The candidates are scored together, in chunks of at most SEARCH_CHUNK_ELEMS
    elements: a search over small groups (GPTQ's, one group at a time) is then a few
    large tensor operations instead of 40 small ones per group. On CPUs with native bf16
    matmuls, a large Hessian's search screens the candidates with a bf16 e @ H (2.3x
    faster than fp32 there), then compares each row's pick with min/max in fp32, so the
    never-worse guarantee holds exactly.
    """
    from .kernels.cpu_dense import native_bf16  # a module-level import would be circular

    wg = _grouped(w, scheme)
    if hessian is not None and wg.shape[1] != 1:
        raise ValueError("a Hessian-weighted clip search takes one group spanning w's columns")
    screen = (hessian is not None and hessian.device.type == "cpu" and hessian.shape[0] >= BF16_SCREEN_MIN
              and native_bf16())
    h_screen = hessian.to(torch.bfloat16) if screen else hessian

    def errors(scale, zero, h):
        """Error of each candidate: scale, zero [C, out, n_groups] -> [C, out, n_groups]."""
        s = scale.float().unsqueeze(-1)
        z = 0.0 if zero is None else zero.float().unsqueeze(-1)
        e = (torch.round(wg / s) + z).clamp_(scheme.qmin, scheme.qmax).sub_(z).mul_(s).sub_(wg)
        if h is None:
            return e.abs().pow_(clip.norm).sum(-1)
        rows = e.reshape(-1, e.shape[-1])
        return (torch.mm(rows.to(h.dtype), h).float() * rows).sum(-1).view(scale.shape)

    lo, hi = wg.amin(-1), wg.amax(-1)
    ratios = torch.tensor(clip.ratios(), device=w.device).view(-1, *([1] * lo.dim()))
    lo_r, hi_r = lo * ratios, hi * ratios
    scales, zeros = qparams_from_range(lo_r, hi_r, scheme, scale_dtype)
    if scheme.symmetric and clip.signed:
        scales = torch.cat([scales, signed_qparams(lo_r, hi_r, scheme, scale_dtype)])
    chunk = max(1, SEARCH_CHUNK_ELEMS // wg.numel())
    best_err = best_scale = best_zero = None
    for c0 in range(0, scales.shape[0], chunk):  # candidates in order; the first of equal errors wins
        scale = scales[c0:c0 + chunk]
        zero = None if zeros is None else zeros[c0:c0 + chunk]
        err = errors(scale, zero, h_screen)
        err, pick = err.min(0)  # the first minimum of the chunk
        scale = scale.gather(0, pick[None])[0]
        zero = None if zero is None else zero.gather(0, pick[None])[0]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    if scheme.symmetric:
        for _ in range(clip.refit):
            q = quantize(w, best_scale, None, scheme).float()
            if hessian is None:
                qg = _grouped(q, scheme)
                num, den = (qg * wg).sum(-1), (qg * qg).sum(-1)
            else:
                qh = torch.mm(q, hessian.float())
                num, den = (qh * w.float()).sum(-1, keepdim=True), (qh * q).sum(-1, keepdim=True)
            refit = torch.where(den > 0, num / den.clamp(min=1e-30), best_scale.float()).to(scale_dtype)
            refit = torch.where(refit == 0, best_scale, refit)
            err = errors(refit[None], None, h_screen)[0]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, refit, best_scale)
    if screen:  # the exact check against min/max (ratio 1.0)
        scale, zero = qparams_from_range(lo, hi, scheme, scale_dtype)
        keep = errors(scale[None], None if zero is None else zero[None], hessian)[0] <= \
            errors(best_scale[None], None if best_zero is None else best_zero[None], hessian)[0]
        best_scale = torch.where(keep, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(keep, zero, best_zero)
    return best_scale, best_zero


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10*log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.float()
    noise = (ref - approx.float()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
