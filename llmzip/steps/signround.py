"""Step "signround": learned rounding of every target Linear of the layer at once,
fitted to the float layer's outputs (llmzip.algorithms.signround).

The inputs are the outputs of the already-quantized earlier layers. The targets are
the float model's own outputs of this layer (SignRoundSettings.target "model", the
default: work.fit_targets), or the float layer's outputs on the same quantized inputs
("layer"); both are taken before any earlier step of the recipe changed the layer
(e.g. AWQ's clipping). The fit runs with autograd on the
layer in place: its own parameters are frozen for the duration and every target
Linear's weight is swapped for its quantize-dequantize through torch.func.

On a CPU without native matmuls for the layer's half dtype (kernels.cpu_dense:
bf16 on AVX2), the fit runs on an fp32 copy of the layer instead, with fp32
inputs: the quantize-dequantized weights are still the half-precision values the
checkpoint decodes to (cast up exactly), only the activations are carried in fp32.
Every product of a step would otherwise be cast up and down around an fp32 matmul,
forward and backward (bench/results/calibrated_peers.md states whole quantize times).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..algorithms.signround import signround
from ..kernels.cpu_dense import emulated_halves, outside_products
from ..quant_linear import QuantLinear
from ..smoothing import run_keeping_first
from ..surgery import set_module
from .base import LayerWork, first, register


@register("signround", full_reference=True)
def round_signround(work: LayerWork) -> None:
    layer, config = work.layer, work.config
    settings = config.signround
    if work.fit_targets is not None:
        fitted = work.fit_targets
    else:
        if work.ref is None or len(work.ref) < len(work.inputs):
            work.ref = run_keeping_first(work.run, work.inputs, None)
        fitted = work.ref
    shapes = {x.shape[1:] for x in work.inputs}
    if len(shapes) != 1:
        raise ValueError(f"SignRound needs calibration samples of one length; got shapes {sorted(shapes)}")
    inputs, targets = torch.cat(work.inputs), torch.cat(fitted)
    weights = {n: lin.weight.data for n, lin in work.names.items()}
    schemes = {n: work.scheme(n) for n in work.names}
    fit, kwargs, products = layer, work.kwargs, contextlib.nullcontext
    if inputs.dtype in emulated_halves(inputs.device):
        fit, kwargs = copy.deepcopy(layer).float(), to_fp32(work.kwargs)
        inputs, products = inputs.float(), outside_products

    def forward(x, dense):
        swapped = {f"{n}.weight": w.to(x.dtype) for n, w in dense.items()}
        return first(torch.func.functional_call(fit, swapped, (x,), kwargs, strict=False))

    bar = tqdm(total=settings.iters, desc=f"signround {work.prefix.rstrip('.')}", unit="step", leave=False,
               disable=not work.progress)

    def on_step(step, loss):
        bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
        bar.update(1)

    frozen = [p for p in fit.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with products(), torch.enable_grad():
            seeded = replace(settings, seed=settings.seed + work.index)
            results, info = signround(forward, weights, inputs, targets, schemes, seeded, on_step)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        bar.close()
    del inputs, targets, fit
    work.block["signround"] = {k: round(v, 8) if isinstance(v, float) else v for k, v in info.items()}
    for n, lin in work.names.items():
        res, scheme = results[n], schemes[n]
        work.stats[work.prefix + n] = {"rel_err": res.rel_err(lin.weight.data, scheme.group_size)}
        set_module(layer, n, QuantLinear.from_quantized(lin, res.q, res.scale, res.zero, scheme))


def to_fp32(kwargs: dict) -> dict:
    """The layer's keyword arguments with floating tensors (rotary tables, additive masks)
    in fp32, inside tuples too."""
    def up(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.float()
        if isinstance(v, tuple):
            return tuple(up(t) for t in v)
        return v

    return {k: up(v) for k, v in kwargs.items()}
