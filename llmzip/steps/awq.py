"""Step "awq": activation-aware smoothing and clipping of the float layer (llmzip.smoothing)."""

from __future__ import annotations

from ..moe import calibrating_all_experts
from ..smoothing import awq_layer
from .base import LayerWork, register


@register("awq")
def smooth(work: LayerWork) -> None:
    # Calibration passes send every token through every MoE expert (llmzip.moe).
    with calibrating_all_experts(work.layer):
        work.ref, work.block["awq"] = awq_layer(work.layer, work.names, work.inputs, work.kwargs, work.config,
                                                work.arch, lambda lyr, x: work.run(x), keep=work.keep,
                                                schemes={n: work.scheme(n) for n in work.names})
