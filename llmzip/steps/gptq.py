"""Step "gptq": GPTQ rounding of every target Linear from its input Hessian.

Linears reading the same input (q/k/v, gate/up) share one Hessian. With
true_sequential, the groups are quantized in forward order, each Hessian collected with
the groups before it already quantized.
"""

from __future__ import annotations

import torch

from ..algorithms.gptq import HessianAccumulator, gptq
from ..kernels.cpu_dense import outside_products
from ..moe import calibrating_all_experts
from ..quant_linear import QuantLinear, cached_dense_weights
from ..smoothing import run_keeping_first
from ..surgery import set_module
from .base import LayerWork, register


@register("gptq")
def round_gptq(work: LayerWork) -> None:
    layer, names, config = work.layer, work.names, work.config
    groups = input_groups(layer, names, work.inputs[0], work.kwargs)
    passes = [[g] for g in groups] if config.gptq.true_sequential else [groups]
    for pass_groups in passes:
        hess = {g[0]: HessianAccumulator(names[g[0]].in_features, names[g[0]].weight.device) for g in pass_groups}
        hooks = [names[n].register_forward_hook(lambda mod, a, out, n=n: hess[n].add(a[0])) for n in hess]
        try:
            with calibrating_all_experts(layer), cached_dense_weights(layer):
                # the float layer's outputs, kept on the first pass unless an earlier step did
                kept = run_keeping_first(work.run, work.inputs, work.keep if work.ref is None else 0)
        finally:
            for h in hooks:
                h.remove()
        if work.ref is None:
            work.ref = kept
        for group in pass_groups:
            H = hess.pop(group[0]).H
            # GPTQ treats rows independently given H: one solve per chunk of the group.
            for chunk in row_chunks(group, names):
                for same in by_scheme(work, chunk):  # mixed precision: one solve per scheme
                    _solve(work, same, H)
    if config.gptq.true_sequential:
        work.block["groups"] = len(groups)


def _solve(work: LayerWork, chunk: list[str], H: torch.Tensor) -> None:
    config = work.config
    lins = [work.names[n] for n in chunk]
    W = torch.cat([lin.weight.data for lin in lins]) if len(lins) > 1 else lins[0].weight.data
    scheme = work.scheme(chunk[0])
    with outside_products():  # fp32 throughout: the forwards' product mode would only slow it
        res, info = gptq(W, H, scheme, config.gptq, config.clip)
    row = 0
    for n, lin in zip(chunk, lins):
        part = res.rows(row, row + lin.out_features)
        row += lin.out_features
        work.stats[work.prefix + n] = {"rel_err": part.rel_err(lin.weight.data, scheme.group_size),
                                       "damp": info["damp"]}
        set_module(work.layer, n, QuantLinear.from_quantized(lin, part.q, part.scale, part.zero, scheme,
                                                             part.g_idx))


def by_scheme(work: LayerWork, chunk: list[str]) -> list[list[str]]:
    """`chunk` split into runs of Linears that share one WeightScheme, in order of first use."""
    runs: dict = {}
    for n in chunk:
        runs.setdefault(work.scheme(n), []).append(n)
    return list(runs.values())


def row_chunks(group: list[str], names: dict, max_rows: int = 8192) -> list[list[str]]:
    """Split a group of Linears into runs of at most `max_rows` output rows (at least
    one Linear each), so a solve over many MoE experts stays bounded in memory."""
    chunks, rows = [[]], 0
    for n in group:
        if chunks[-1] and rows + names[n].out_features > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(n)
        rows += names[n].out_features
    return chunks


@torch.no_grad()
def input_groups(layer, names: dict, x, kwargs: dict) -> list[list[str]]:
    """The Linears of `names` grouped by the input tensor they read, in the order the
    forward pass first uses them (one pass on one sample). References to the inputs
    are held during the pass, so two groups cannot share a recycled buffer."""
    seen: list = []  # (input tensor, [names])

    def record(n, x):
        group = next((g for t, g in seen if t is x), None)
        if group is None:
            seen.append((x, [n]))
        else:
            group.append(n)

    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: record(n, a[0])) for n, m in names.items()]
    try:
        with calibrating_all_experts(layer):
            layer(x, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups = [g for _, g in seen]
    missing = [n for n in names if not any(n in g for g in groups)]
    return groups + ([missing] if missing else [])
