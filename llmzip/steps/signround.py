"""Step "signround": learned rounding of every target Linear of the layer at once,
fitted to the float layer's outputs (llmzip.algorithms.signround).

The inputs are the outputs of the already-quantized earlier layers; the targets are
the float layer's outputs on those same inputs (taken before any earlier step of the
recipe changed the layer, e.g. AWQ's clipping). The fit runs with autograd on the
layer in place: its own parameters are frozen for the duration and every target
Linear's weight is swapped for its quantize-dequantize through torch.func.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..algorithms.signround import signround
from ..quant_linear import QuantLinear
from ..smoothing import run_keeping_first
from ..surgery import set_module
from .base import LayerWork, first, register


@register("signround", full_reference=True)
def round_signround(work: LayerWork) -> None:
    layer, config = work.layer, work.config
    settings = config.signround
    if work.ref is None or len(work.ref) < len(work.inputs):
        work.ref = run_keeping_first(work.run, work.inputs, None)
    shapes = {x.shape[1:] for x in work.inputs}
    if len(shapes) != 1:
        raise ValueError(f"SignRound needs calibration samples of one length; got shapes {sorted(shapes)}")
    inputs, targets = torch.cat(work.inputs), torch.cat(work.ref)
    weights = {n: lin.weight.data for n, lin in work.names.items()}
    schemes = {n: work.scheme(n) for n in work.names}

    def forward(x, dense):
        swapped = {f"{n}.weight": w for n, w in dense.items()}
        return first(torch.func.functional_call(layer, swapped, (x,), work.kwargs, strict=False))

    bar = tqdm(total=settings.iters, desc=f"signround {work.prefix.rstrip('.')}", unit="step", leave=False,
               disable=not work.progress)

    def on_step(step, loss):
        bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
        bar.update(1)

    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            seeded = replace(settings, seed=settings.seed + work.index)
            results, info = signround(forward, weights, inputs, targets, schemes, seeded, on_step)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        bar.close()
    del inputs, targets
    work.block["signround"] = {k: round(v, 8) if isinstance(v, float) else v for k, v in info.items()}
    for n, lin in work.names.items():
        res, scheme = results[n], schemes[n]
        work.stats[work.prefix + n] = {"rel_err": res.rel_err(lin.weight.data, scheme.group_size)}
        set_module(layer, n, QuantLinear.from_quantized(lin, res.q, res.scale, res.zero, scheme))
