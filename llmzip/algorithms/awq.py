"""AWQ (Lin et al., 2023) as pure functions: activation-aware scales and clipping.

Scaling input channel j of a Linear by s_j (and dividing whatever produces that
channel by s_j) leaves the float model unchanged but changes how the weights round:
channels that see large activations get finer effective steps. The search picks
s = mean|x|^alpha (normalised) for the alpha on a grid that minimises the output error
of the quantized balance layers on calibration activations. alpha = 0 is plain RTN,
and it is always on the grid, so the result is never worse than RTN on that objective.
"""

from __future__ import annotations

import torch

from ..config import WeightScheme
from ..primitives import dequantize, minmax_qparams, quantize


def fake_quant(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """RTN quantize-dequantize of w [out, in] in fp32 (scales kept in fp32 here)."""
    scale, zero = minmax_qparams(w, scheme, torch.float32)
    return dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme.group_size, torch.float32)


def output_error(x: torch.Tensor, weights: list[torch.Tensor], approx: list[torch.Tensor],
                 gram: torch.Tensor | None = None) -> float:
    """Mean squared error of x @ W^T over all balance layers. gram: x^T x [in, in], to
    compute the same sum as sum((D gram) * D) for each D = approx - weight: the cost per
    call then scales with in instead of with x's rows."""
    if gram is None:
        total = sum((x @ (a - w).t()).pow(2).sum().item() for w, a in zip(weights, approx))
    else:
        total = sum(((a - w) @ gram * (a - w)).sum().item() for w, a in zip(weights, approx))
    return total / (x.shape[0] * sum(w.shape[0] for w in weights))


@torch.no_grad()
def search_scales(
    x: torch.Tensor, x_absmean: torch.Tensor, weights: list[torch.Tensor], scheme: WeightScheme, grid: int = 20
) -> tuple[torch.Tensor, dict]:
    """Best per-input-channel scales for a set of Linears that read the same input.

    x: [n, in] sample of the input activations (fp32); x_absmean: [in] mean |x| over
    all calibration tokens; weights: [out_k, in] fp32 each. Returns (scales [in] fp32,
    info {"alpha", "error", "error_rtn"}); quantize W * scales and divide the producer
    of x by scales to apply them.
    """
    ws = [w.float() for w in weights]
    gram = x.t() @ x if x.shape[0] > x.shape[1] else None  # fewer multiply-adds per grid point
    base = x_absmean.float().clamp(min=1e-8)
    best = (None, None, float("inf"))
    error_rtn = None
    for i in range(grid):
        alpha = i / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        approx = [fake_quant(w * s, scheme) / s for w in ws]
        err = output_error(x, ws, approx, gram)
        if i == 0:
            error_rtn = err
        if err < best[2]:
            best = (alpha, s, err)
    alpha, s, err = best
    return s, {"alpha": alpha, "error": err, "error_rtn": error_rtn}


@torch.no_grad()
def search_clip(
    x: torch.Tensor, w: torch.Tensor, scheme: WeightScheme, grid: int = 20, min_ratio: float = 0.5
) -> torch.Tensor:
    """Per-group clipping ratios [out, n_groups] that minimise each group's share of
    the output error, sum_t (x_t,g . (q(w_g) - w_g))^2, over a grid in [min_ratio, 1].
    Ratio 1.0 (no clipping) is on the grid."""
    out_f, in_f = w.shape
    G = scheme.group_size or in_f
    wg = w.float().reshape(out_f, in_f // G, G)
    xg = x.float().reshape(x.shape[0], in_f // G, G)
    # sum_t (x_t,g . d_g)^2 = d_g^T C_g d_g with C_g = X_g^T X_g: one Gram matrix per
    # group, so the cost per ratio no longer grows with the number of tokens.
    gram = torch.einsum("tgk,tgl->gkl", xg, xg)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    one = WeightScheme(scheme.bits, None, scheme.symmetric)
    best_err = torch.full((out_f, in_f // G), float("inf"), device=w.device)
    best_ratio = torch.ones(out_f, in_f // G, device=w.device)
    for i in range(grid):
        r = 1.0 - i * (1.0 - min_ratio) / max(grid - 1, 1)
        clipped = torch.maximum(torch.minimum(wg, hi * r), lo * r).reshape(-1, G)
        dq = fake_quant(clipped, one).reshape(out_f, in_f // G, G)
        # error per (out, group): sum over tokens of (x_g . (dq_g - w_g))^2
        diff = dq - wg
        err = torch.einsum("ogk,gkl,ogl->og", diff, gram, diff)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio


def apply_clip(w: torch.Tensor, ratio: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Clamp each group of w [out, in] to ratio * its [min, max] range."""
    out_f, in_f = w.shape
    G = group_size or in_f
    wg = w.float().reshape(out_f, in_f // G, G)
    r = ratio.unsqueeze(-1)
    lo, hi = wg.amin(-1, keepdim=True) * r, wg.amax(-1, keepdim=True) * r
    return torch.maximum(torch.minimum(wg, hi), lo).reshape(out_f, in_f).to(w.dtype)
