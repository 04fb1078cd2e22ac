"""GPTQ (Frantar et al., 2022) as a pure function: (weight, Hessian, settings) -> codes.

Columns are quantized one at a time; the rounding error of each is spread over the
columns not yet quantized, weighted by the inverse Hessian of the layer inputs
(H = 2/n * sum x x^T), so the layer *output* error is minimised rather than the
weight error. Lazy batch updates apply the spread to the far columns once per
block of `block_size` columns.
"""

from __future__ import annotations

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
) -> tuple[QuantResult, dict]:
    """Quantize weight [out, in] given the input Hessian H [in, in] (fp32).

    Returns (QuantResult, info) where info = {"damp": used damping}. With act_order
    (and not static_groups) the result carries g_idx [in]: the group of each column
    in the checkpoint's natural column order; scale/zero are indexed by that group.
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
    scales = torch.zeros(out_f, n_groups, dtype=dtype, device=W.device)
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
            if static is not None:  # per-channel
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
    return QuantResult(Q, scales, None if scheme.symmetric else zeros, g_idx), {"damp": damp}
