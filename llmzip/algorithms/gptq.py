"""GPTQ (Frantar et al., 2022) as a pure function: (weight, Hessian, settings) -> codes.

Columns are quantized one at a time; the rounding error of each is spread over the
columns not yet quantized, weighted by the inverse Hessian of the layer inputs
(H = 2/n * sum x x^T), so the layer *output* error is minimised rather than the
weight error. Lazy batch updates apply the spread to the far columns once per
block of `block_size` columns.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import ClipSearch, GPTQSettings, WeightScheme
from ..kernels.cpu_dense import native_bf16
from ..primitives import minmax_qparams, mse_clip_qparams
from .rtn import QuantResult

log = logging.getLogger("llmzip")


class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over all input rows seen, in fp32.

    H is symmetric, so each add computes only the block rows of its upper triangle
    (about 60% of the multiply-adds of a full x^T x); `H` mirrors it when read.

    bf16 activations on a CPU with native bf16 matmuls (cpu_dense.native_bf16) are
    multiplied in bf16: the products of bf16 values are exact in the GEMM's fp32
    accumulator, so the only extra rounding is that of each call's partial sum to bf16
    (2^-9 relative) before it is added into the fp32 total, for twice the speed of an
    fp32 GEMM there. Other inputs, and every input on other CPUs (where torch's bf16 GEMM
    is a scalar loop), are multiplied in fp32.
    """

    BLOCK = 128

    def __init__(self, in_features: int, device=None):
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [..., in_features] activations entering the Linear layer."""
        x = x.reshape(-1, x.shape[-1]).to(self._upper.device)
        if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and native_bf16()):
            x = x.float()
        m = x.shape[0]
        self._upper *= self.n / (self.n + m)
        self.n += m
        alpha = 2.0 / self.n
        for i in range(0, x.shape[1], self.BLOCK):
            part = torch.mm(x[:, i:i + self.BLOCK].t(), x[:, i:])
            self._upper[i:i + self.BLOCK, i:].add_(part, alpha=alpha)

    @property
    def H(self) -> torch.Tensor:
        return torch.triu(self._upper) + torch.triu(self._upper, 1).t()


def _group_qparams(w: torch.Tensor, scheme: WeightScheme, dtype, clip: ClipSearch | None, H: torch.Tensor):
    """(scale, zero) [out, 1] for one block of columns w [out, k] treated as one group;
    H [k, k]: the Hessian block of those columns, which weighs the clip search's error."""
    one = WeightScheme(scheme.bits, None, scheme.symmetric)
    if clip is None:
        return minmax_qparams(w, one, dtype)
    return mse_clip_qparams(w, one, dtype, clip, hessian=H)


def _inverse_hessian_chol(H: torch.Tensor, settings: GPTQSettings) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, escalating damp on failure."""
    mean_diag = H.diagonal().mean().item()
    damp = settings.damp
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    while True:
        try:
            L = torch.linalg.cholesky(H + damp * mean_diag * eye)
            Hinv = torch.cholesky_inverse(L)
            U = torch.linalg.cholesky(Hinv, upper=True)
            if torch.isfinite(U).all():
                if damp != settings.damp:
                    log.warning("GPTQ: Hessian not positive definite; damping raised to %g", damp)
                return U, damp
        except torch.linalg.LinAlgError:
            pass
        damp *= 10
        if damp > settings.max_damp:
            raise RuntimeError(f"GPTQ: Hessian stays singular up to damp={settings.max_damp}")


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    H: torch.Tensor,
    scheme: WeightScheme,
    settings: GPTQSettings = GPTQSettings(),
    clip: ClipSearch | None = None,
    fixed: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[QuantResult, dict]:
    """Quantize weight [out, in] given the input Hessian H [in, in] (fp32).

    Returns (QuantResult, info) where info = {"damp": used damping}. With act_order
    (and not static_groups) the result carries g_idx [in]: the group of each column
    in the checkpoint's natural column order; scale/zero are indexed by that group.
    fixed: (scale, zero) [out, n_groups] to round onto instead of choosing them; used by
    settings.scale_refit, which alternates rounding with a least-squares scale refit. The
    result keeps their values and dtype (the weight may be an fp32 working copy).
    """
    out_f, in_f = weight.shape
    dtype = weight.dtype
    W = weight.float().clone()
    H = H.float().clone()
    G = scheme.group_size or in_f
    n_groups = in_f // G

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    refine = fixed is None and settings.scale_refit > 0
    W0, H0 = (W.clone(), H.clone()) if refine else (None, None)  # the refit's objective: before GPTQ updates W
    if fixed is not None:
        fixed_s, fixed_z = fixed
        fixed_s = fixed_s.to(W.device)
        fixed_z = None if fixed_z is None else fixed_z.to(W.device)
    # Per-channel: one group, fixed up front. Grouped: computed below, per group.
    static = _group_qparams(W, scheme, dtype, clip, H) if scheme.group_size is None else None
    perm = None
    if settings.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        if settings.static_groups and scheme.group_size is not None:
            groups = [_group_qparams(W[:, g * G:(g + 1) * G], scheme, dtype, clip, H[g * G:(g + 1) * G, g * G:(g + 1) * G])
                      for g in range(n_groups)]
        W, H = W[:, perm], H[perm][:, perm]

    U, damp = _inverse_hessian_chol(H, settings)
    Q = torch.zeros(out_f, in_f, dtype=torch.int8, device=W.device)
    scales = torch.zeros(out_f, n_groups, dtype=dtype if fixed is None else fixed[0].dtype, device=W.device)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.int8, device=W.device)
    col_group = [0] * in_f  # group of each (permuted) position
    order = perm.tolist() if perm is not None else None
    diag = U.diagonal().tolist()
    g_now, sf, zf = None, None, 0.0
    B = settings.block_size
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1, Err = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=W.device)
        Q1 = torch.empty_like(W1)
        for j in range(i2 - i1):
            c = i1 + j  # position in (possibly permuted) order
            if fixed is not None:
                g = 0 if static is not None else (order[c] // G if settings.static_groups else c // G)
                s = fixed_s[:, g:g + 1]
                z = None if fixed_z is None else fixed_z[:, g:g + 1]
            elif static is not None:  # per-channel
                g, (s, z) = 0, static
            elif settings.act_order and settings.static_groups:
                g = order[c] // G
                s, z = groups[g]
            else:  # groups formed in quantization order from the updated weights
                g = c // G
                if c % G == 0:
                    block = torch.cat([W1[:, j:], W[:, i2:]], dim=1)[:, :G]
                    s, z = _group_qparams(block, scheme, dtype, clip, H[c:c + G, c:c + G])
                    g_now = None
            if g != g_now:  # a new group's (scale, zero): record them once
                g_now = g
                scales[:, g:g + 1] = s
                sf = s.float()[:, 0]
                zf = 0.0 if z is None else z.float()[:, 0]
                if z is not None:
                    zeros[:, g:g + 1] = z
            col_group[c] = g
            w = W1[:, j]
            q = (w / sf).round_().add_(zf).clamp_(scheme.qmin, scheme.qmax)
            Q1[:, j] = q
            err = (w - (q - zf) * sf) / diag[c]
            W1[:, j:].addr_(err, U[c, c:i2], alpha=-1)
            Err[:, j] = err
        Q[:, i1:i2] = Q1.to(torch.int8)
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    col_group = torch.tensor(col_group, dtype=torch.long)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if not settings.static_groups and scheme.group_size is not None:
            g_idx = col_group[inv.cpu()].to(torch.int32)
    res = QuantResult(Q, scales, None if scheme.symmetric else zeros, g_idx)
    info = {"damp": damp}
    if refine:
        res, info["refit_gain"] = _refine(W0, H0, res, scheme, settings)
    return res, info


def output_error(W: torch.Tensor, H: torch.Tensor, res: QuantResult, group_size: int | None) -> torch.Tensor:
    """Per output row, tr(E H E^T) with E = W - dequant(res): the layer-output error
    GPTQ minimises (H = 2/n sum x x^T). W, H fp32; returns [out] fp32."""
    E = W - res.dequantize(group_size).to(W.device)
    return ((E @ H) * E).sum(1)


def _column_groups(res: QuantResult, scheme: WeightScheme, in_f: int) -> torch.Tensor:
    """Group index of each input column in natural order."""
    if res.g_idx is not None:
        return res.g_idx.long().to(res.q.device)
    G = scheme.group_size or in_f
    return torch.arange(in_f, device=res.q.device) // G


@torch.no_grad()
def refit_scales(W: torch.Tensor, H: torch.Tensor, res: QuantResult, scheme: WeightScheme,
                 ridge: float = 1e-6, max_elems: int = 1 << 25) -> torch.Tensor:
    """Scales [out, n_groups] (fp32) minimising tr(E H E^T) for res's codes and zeros.

    Each row's dequantized weight is A s, where A [in, n_groups] holds the row's centred
    codes (q - zero) in the column of their group, so the best scales solve the normal
    equations (A^T H A) s = A^T H w: one n_groups x n_groups system per row. Unlike a
    per-group weight-MSE refit, this sees the cross-group terms of H. A ridge of
    `ridge` x the mean diagonal pulls towards the current scales, so a group whose codes
    are all zero keeps its scale. Rows are solved in chunks of at most `max_elems`
    intermediate elements."""
    out_f, in_f = W.shape
    n_groups = res.scale.shape[1]
    cols = _column_groups(res, scheme, in_f)
    order = torch.argsort(cols, stable=True)
    Gs = in_f // n_groups
    zero = 0.0 if res.zero is None else torch.repeat_interleave(res.zero.float(), Gs, dim=1)
    C = (res.q.float()[:, order] - zero)  # groups contiguous after `order`
    Hp = H[order][:, order]
    b = ((W[:, order] @ Hp) * C).view(out_f, n_groups, Gs).sum(-1)
    old = res.scale.float()
    new = torch.empty_like(old)
    Hg = Hp.view(n_groups, Gs, in_f)
    eye = torch.eye(n_groups, device=W.device)
    step = max(1, max_elems // (n_groups * in_f))
    for r0 in range(0, out_f, step):
        c = C[r0:r0 + step].view(-1, n_groups, Gs)
        Y = torch.bmm(c.transpose(0, 1), Hg)  # [ng, r, in]: the group's codes times H
        M = (Y.view(n_groups, -1, n_groups, Gs) * c.unsqueeze(0)).sum(-1).permute(1, 0, 2)
        lam = ridge * M.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None]
        rhs = b[r0:r0 + step] + lam[:, :, 0] * old[r0:r0 + step]
        new[r0:r0 + step] = torch.linalg.solve(M + lam * eye, rhs)
    return new


def _refine(W: torch.Tensor, H: torch.Tensor, res: QuantResult, scheme: WeightScheme,
            settings: GPTQSettings) -> tuple[QuantResult, float]:
    """settings.scale_refit rounds of: refit the scales for the codes (refit_scales),
    then round again onto the refitted scales (GPTQ with them fixed). Each row keeps
    whichever candidate has the lowest output error. Returns the result and the ratio
    of its total output error to the first rounding's."""
    G = scheme.group_size
    best = res
    err = output_error(W, H, best, G)
    first = err.sum().item()
    plain = dataclasses.replace(settings, scale_refit=0)
    for _ in range(settings.scale_refit):
        s = refit_scales(W, H, best, scheme)
        if not scheme.symmetric:  # asymmetric grids keep positive scales
            s = torch.where(s > 0, s, best.scale.float())
        fitted = QuantResult(best.q, s.to(best.scale.dtype), best.zero, best.g_idx)
        again, _ = gptq(W, H, scheme, plain, fixed=(fitted.scale, fitted.zero))
        for cand in (fitted, again):
            e = output_error(W, H, cand, G)
            better = e < err
            if better.any():
                best = _take_rows(best, cand, better)
                err = torch.where(better, e, err)
    return best, err.sum().item() / max(first, 1e-30)


def _take_rows(a: QuantResult, b: QuantResult, rows: torch.Tensor) -> QuantResult:
    """a with the output rows where `rows` is true taken from b (same g_idx)."""
    r = rows[:, None]
    zero = None if a.zero is None else torch.where(r, b.zero, a.zero)
    return QuantResult(torch.where(r, b.q, a.q), torch.where(r, b.scale, a.scale), zero, a.g_idx)
