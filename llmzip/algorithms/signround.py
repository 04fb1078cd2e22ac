"""SignRound (Cheng et al., 2023, "Optimize Weight Rounding via Signed Gradient
Descent"; Intel's AutoRound) as a pure function: block, weights and calibration
activations in, integer codes and scales out.

Each weight W [out, in] gets a rounding offset V [out, in] in [-0.5, 0.5] and, per
group, factors alpha, beta in [min_clip, 1] that shrink the group's range:
    lo = alpha * min(W_g, 0), hi = beta * max(W_g, 0)  ->  scale (and zero point)
A symmetric scale maps the larger-magnitude end of [lo, hi] onto qmin, the grid's
longer side (negative where that end is positive; primitives.signed_qparams), so all
2^b levels cover it: at 2 bits the step is |end| / 2 instead of |end| / 1.
    Q = clamp(round(W / scale + V) + zero, qmin, qmax),  W_hat = (Q - zero) * scale
All of them are fitted together to minimise the MSE between the block's output with
W_hat and the float block's output on the same inputs. round() passes gradients
straight through; each step moves every parameter by lr * sign(gradient), with lr
decaying linearly to 0, and the parameters of the step with the lowest loss are kept.
V = 0, alpha = beta = 1 (the start) is plain round-to-nearest (on the signed grid when
symmetric).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import SignRoundSettings, WeightScheme
from .rtn import QuantResult


def store_ste(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as stored in `dtype` (the value the checkpoint dequantizes with), with
    the gradient of the unrounded one."""
    return scale + (scale.to(dtype).float() - scale).detach()


class _RoundDequant(torch.autograd.Function):
    """(Q - zero) * scale with Q = clamp(round(W / scale + V) + zero, qmin, qmax), in
    `dtype`, as one function whose backward is the straight-through estimate: round()
    has derivative 1, clamp() 0 outside the grid. Fewer passes over [out, in] than
    autograd through the elementwise ops (this is the cost of each step on a CPU).
    wg, v: [out, n_groups, G] fp32; scale, zero: [out, n_groups, 1] fp32 (zero 0 when
    symmetric). Returns ([out, n_groups, G] in dtype, codes Q fp32)."""

    @staticmethod
    def forward(ctx, wg, v, scale, zero, qmin, qmax, dtype):
        ws = wg / scale
        q = torch.round(ws + v).add_(zero)
        inside = (q >= qmin) & (q <= qmax)
        q.clamp_(qmin, qmax)
        code = q - zero
        ctx.save_for_backward(ws, code, scale, inside)
        ctx.mark_non_differentiable(q)
        return (code * scale).to(dtype), q

    @staticmethod
    def backward(ctx, grad, _grad_q):
        ws, code, scale, inside = ctx.saved_tensors
        g = grad.float()
        grad_v = g * scale * inside
        # d/ds of (round(w/s + v) * s): code - w/s inside the grid (round passes through), code outside
        grad_s = (g * (code - ws * inside)).sum(-1, keepdim=True)
        return None, grad_v, grad_s, None, None, None, None


def qdq(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
        beta: torch.Tensor, scheme: WeightScheme, dtype: torch.dtype):
    """Differentiable quantize-dequantize of one weight.

    wg, v: [out, n_groups, G] fp32; lo, hi: [out, n_groups] the groups' min(w, 0) and
    max(w, 0); alpha, beta: [out, n_groups] range factors. Returns (W_hat [out,
    n_groups, G] in `dtype`, codes fp32, scale [out, n_groups] fp32 (a `dtype` value),
    zero [out, n_groups] fp32 or None). Same conventions as llmzip.primitives."""
    lo, hi = lo * alpha, hi * beta
    tiny = torch.finfo(dtype).tiny * 16
    if scheme.symmetric:
        end = torch.where(hi > -lo, hi, lo)  # the larger-magnitude end, with its sign
        scale = end / scheme.qmin
        scale = store_ste(torch.where(end > 0, scale.clamp(max=-tiny), scale.clamp(min=tiny)), dtype)
        zero = None
    else:
        scale = store_ste(((hi - lo) / ((1 << scheme.bits) - 1)).clamp(min=tiny), dtype)
        zero = torch.round(scheme.qmin - lo / scale).clamp(scheme.qmin, scheme.qmax).detach()
    z = torch.zeros((), device=wg.device) if zero is None else zero.unsqueeze(-1)
    deq, q = _RoundDequant.apply(wg, v, scale.unsqueeze(-1), z, scheme.qmin, scheme.qmax, dtype)
    return deq, q, scale, zero


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The fitted loss between the block's output and the float block's output [b, L, d]:
    "mse", the mean squared error over every element, or "relative", the mean over
    tokens of |out - target|^2 / |target|^2 (SignRoundSettings.loss)."""
    err = (out.float() - target.float()).pow(2)
    if kind == "mse":
        return err.mean()
    norm = target.float().pow(2).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    return (err.sum(-1) / norm).mean()


def signround(
    forward: Callable[[torch.Tensor, dict], torch.Tensor],
    weights: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    scheme: WeightScheme | dict[str, WeightScheme],
    settings: SignRoundSettings = SignRoundSettings(),
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, QuantResult], dict]:
    """Fit rounding offsets and range factors for the weights of one block.

    forward(x, dense): the block's output [b, L, d] on inputs x [b, L, d] with each
    weight `name` replaced by dense[name] (in the weight's dtype); it must not change
    anything else. weights: {name: W [out, in]} (their dtype is the scales' storage
    dtype). inputs / targets: [N, L, d] block inputs and the float block's outputs on
    them. scheme: one WeightScheme for every weight, or {name: WeightScheme}. Each step draws `settings.batch` of the N samples. on_step(step, loss) is
    called after each step. Returns ({name: QuantResult}, info with the first, best and
    last step losses and the best step)."""
    schemes = scheme if isinstance(scheme, dict) else {n: scheme for n in weights}
    dtypes = {n: w.dtype for n, w in weights.items()}
    shapes = {n: w.shape for n, w in weights.items()}
    fixed, params = {}, {}  # per weight: (W grouped fp32, lo, hi); (V, alpha, beta)
    for n, w in weights.items():
        out_f, in_f = w.shape
        G = schemes[n].group_size or in_f
        wg = w.detach().float().reshape(out_f, in_f // G, G)
        fixed[n] = (wg, wg.amin(-1).clamp(max=0.0), wg.amax(-1).clamp(min=0.0))
        params[n] = [torch.zeros_like(wg, requires_grad=True),
                     torch.ones(out_f, in_f // G, device=w.device, requires_grad=settings.minmax),
                     torch.ones(out_f, in_f // G, device=w.device, requires_grad=settings.minmax)]
    trained = [p for ps in params.values() for p in ps if p.requires_grad]
    gen = torch.Generator().manual_seed(settings.seed)
    lr0, iters, n = settings.step_size, settings.iters, inputs.shape[0]
    best_loss, best_step, first_loss, loss_v = float("inf"), -1, None, None
    best = [p.detach().clone() for p in trained]
    for step in range(iters):
        idx = torch.randperm(n, generator=gen)[: settings.batch].to(inputs.device)
        dense = {k: qdq(*fixed[k], *params[k], schemes[k], dtypes[k])[0].reshape(shapes[k]) for k in fixed}
        out = forward(inputs[idx], dense)
        loss = block_loss(out, targets[idx], settings.loss)
        loss_v = loss.item()
        first_loss = loss_v if first_loss is None else first_loss
        if loss_v < best_loss:  # the parameters that produced this loss, before the update
            best_loss, best_step = loss_v, step
            best = [p.detach().clone() for p in trained]
        loss.backward()
        lr = lr0 * (1.0 - step / iters)
        with torch.no_grad():
            for ps in params.values():
                v, a, b = ps
                v.sub_(lr * v.grad.sign()).clamp_(-0.5, 0.5)
                v.grad = None
                for f in (a, b) if settings.minmax else ():
                    f.sub_(lr * f.grad.sign()).clamp_(settings.min_clip, 1.0)
                    f.grad = None
        if on_step is not None:
            on_step(step, loss_v)
    with torch.no_grad():
        for p, kept in zip(trained, best):
            p.copy_(kept)
        results = {}
        for k in fixed:
            _, q, scale, zero = qdq(*fixed[k], *params[k], schemes[k], dtypes[k])
            results[k] = QuantResult(q.to(torch.int8).reshape(shapes[k]), scale.to(dtypes[k]),
                                     None if zero is None else zero.to(torch.int8))
    info = {"iters": iters, "loss_first": first_loss, "loss_best": None if best_step < 0 else best_loss,
            "loss_last": loss_v, "best_step": best_step}
    return results, info
