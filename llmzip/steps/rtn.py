"""Step "rtn": round every target Linear to nearest (after earlier steps, e.g. AWQ)."""

from __future__ import annotations

from ..algorithms import rtn
from ..quant_linear import QuantLinear
from ..smoothing import run_keeping_first
from ..surgery import set_module
from .base import LayerWork, register


@register("rtn")
def round_to_nearest(work: LayerWork) -> None:
    config = work.config
    if work.ref is None:  # no earlier step ran the float layer
        work.ref = run_keeping_first(work.run, work.inputs, work.keep)
    for n, lin in work.names.items():
        scheme = work.scheme(n)
        res = rtn(lin.weight.data, scheme, config.clip)
        work.stats[work.prefix + n] = {"rel_err": res.rel_err(lin.weight.data, scheme.group_size)}
        set_module(work.layer, n, QuantLinear.from_quantized(lin, res.q, res.scale, res.zero, scheme))
