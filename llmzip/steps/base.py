"""What the per-layer steps of a calibrated recipe share: the layer's work state and
the registry that names the steps.

A calibrated method is an ordered list of steps run on each decoder layer (for example
smooth with AWQ, then round with GPTQ); see config.recipe_steps. Each step is a function
`step(work: LayerWork) -> None` in its own module, registered under its name: it reads
the layer, its inputs and the settings from `work`, edits the layer in place (a
transform keeps the float function, a rounding step swaps in QuantLinear modules), and
records its statistics in `work.stats` / `work.block`. The math stays in pure functions
(llmzip.algorithms); a step is the small adapter around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..arch import Arch
from ..config import QuantConfig


def first(out):
    """A decoder layer returns a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerWork:
    """One decoder layer being calibrated.

    names: {name relative to the layer: nn.Linear} to quantize. inputs: the layer's
    inputs, batches [b, L, d] from the already-quantized earlier layers. kwargs: what the
    model passes to every layer (rotary tables, mask). keep: how many float outputs to
    keep in `ref` (None: all, for steps that fit to them). ref: the float layer's
    outputs on the first `keep` inputs, set by the first step that runs the float layer.
    index: the layer's position (seeds per-layer randomness). stats: per-Linear
    statistics keyed by full name; block: per-layer statistics. fit_targets: the float
    model's own outputs of this layer, one per input batch, when the run carries a
    float stream (QuantConfig.float_stream); a fitting step then fits to them instead
    of the float layer's outputs on `inputs`.
    """

    layer: nn.Module
    prefix: str
    names: dict
    inputs: list
    kwargs: dict
    config: QuantConfig
    arch: Arch
    keep: int | None
    index: int = 0
    progress: bool = False
    ref: list | None = None
    stats: dict = field(default_factory=dict)
    block: dict = field(default_factory=dict)
    fit_targets: list | None = None

    def scheme(self, name: str):
        """The WeightScheme of the Linear `name` (relative to the layer): config.scheme_for."""
        return self.config.scheme_for(self.prefix + name)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output hidden states for one input batch."""
        return first(self.layer(x, **self.kwargs))


@dataclass(frozen=True)
class Step:
    name: str
    apply: Callable[[LayerWork], None]
    full_reference: bool = False  # fits to the float outputs of every input, not a sample


STEPS: dict[str, Step] = {}


def register(name: str, full_reference: bool = False):
    """Decorator: register `fn(work)` as the step called `name`."""

    def wrap(fn):
        STEPS[name] = Step(name, fn, full_reference)
        return fn

    return wrap


def reference_keep(steps: tuple[str, ...], sample: int) -> int | None:
    """How many float outputs a recipe keeps: all if a step fits to them, else `sample`."""
    return None if any(STEPS[s].full_reference for s in steps) else sample


def run_steps(work: LayerWork, steps: tuple[str, ...]) -> None:
    missing = [s for s in steps if s not in STEPS]
    if missing:
        raise ValueError(f"unknown calibration step(s) {missing}: known steps are {sorted(STEPS)}")
    for s in steps:
        STEPS[s].apply(work)
