"""Applying AWQ to one decoder layer: capture activations, search, fold scales in.

The search itself is pure (llmzip.algorithms.awq); this module owns the hooks and the
in-place edits of the layer's weights, which keep the float model's function
unchanged: prev's output channel j is divided by s_j, and column j of every balance
Linear is multiplied by s_j.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .algorithms.awq import apply_clip, search_clip, search_scales
from .arch import Arch, Smooth
from .config import QuantConfig

# Queries and keys pass through a softmax that amplifies errors; AWQ does not clip them.
_NO_CLIP = ("q_proj", "k_proj", "qkv_proj")


def _out_features(mod: nn.Module) -> int | None:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    w = getattr(mod, "weight", None)
    return w.numel() if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def _count(layer: nn.Module, pattern: str) -> int:
    """How many experts a `*` pattern ranges over in `layer` (0 if its container is absent)."""
    try:
        return len(layer.get_submodule(pattern.split(".*.", 1)[0]))
    except (AttributeError, TypeError):
        return 0


def expand(layer: nn.Module, m: Smooth) -> list[Smooth]:
    """Concrete mappings for `layer`: `*` in balance/follow lists every expert; a `*` in
    prev makes one mapping per expert."""
    names = [m.prev, *m.balance, *m.follow]
    star = next((n for n in names if ".*." in n), None)
    if star is None:
        return [m]
    n = _count(layer, star)

    def at(names, e):
        return tuple(x.replace(".*.", f".{e}.") for x in names)

    def every(names):  # in order, each `*` name replaced by one name per expert
        return tuple(y for x in names for y in ([at([x], e)[0] for e in range(n)] if ".*." in x else [x]))

    if ".*." in m.prev:
        return [Smooth(at([m.prev], e)[0], at(m.balance, e), at(m.follow, e)) for e in range(n)]
    return [Smooth(m.prev, every(m.balance), every(m.follow))] if n else []


def applicable(layer: nn.Module, m: Smooth) -> bool:
    """True when prev exists and its output width equals every balance layer's input (and
    every follow module's weight columns)."""
    try:
        prev = layer.get_submodule(m.prev)
        balance = [layer.get_submodule(b) for b in m.balance]
        follow = [layer.get_submodule(f) for f in m.follow]
    except AttributeError:
        return False
    width = _out_features(prev)
    return (width is not None and all(isinstance(b, nn.Linear) and b.in_features == width for b in balance)
            and all(getattr(f, "weight", None) is not None and f.weight.shape[-1] == width for f in follow))


@torch.no_grad()
def fold_scales(layer: nn.Module, m: Smooth, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide prev's output channels by s and multiply the balance layers' columns by s."""
    prev = layer.get_submodule(m.prev)
    s = s.float().to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.copy_(prev.weight.float() / s.view(-1, 1))
    else:  # a norm: y = x_normed * (offset + weight) [+ bias]
        prev.weight.copy_((norm_offset + prev.weight.float()) / s - norm_offset)
    if getattr(prev, "bias", None) is not None:
        prev.bias.copy_(prev.bias.float() / s)
    for name in (*m.balance, *m.follow):
        lin = layer.get_submodule(name)
        lin.weight.copy_(lin.weight.float() * s.view(1, -1))


class _Inputs:
    """Per-Linear input statistics: mean |x| over all tokens, and a strided sample."""

    def __init__(self, stride: int):
        self.stride, self.abs_sum, self.count, self.sample = stride, None, 0, []

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        self.sample.append(x[:: self.stride])

    def absmean(self) -> torch.Tensor:
        return self.abs_sum / self.count

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.sample)


def run_keeping_first(run, inputs: list, keep: int | None) -> list:
    """Call `run(x)` on every input (forward hooks see them all) and return the outputs of
    the first `keep` inputs (all when None): the reference kept for later comparisons."""
    kept = []
    for i, x in enumerate(inputs):
        out = run(x)
        if keep is None or i < keep:
            kept.append(out)
    return kept


@torch.no_grad()
def awq_layer(layer: nn.Module, names: dict, inputs: list, kwargs: dict, config: QuantConfig, arch: Arch,
              run, keep: int | None = None, schemes: dict | None = None) -> tuple[list, dict]:
    """Smooth (and clip) one layer in place. `names`: {relative name: nn.Linear} to be
    quantized; `run(layer, x)` runs the layer on one input. Returns (float outputs
    before smoothing, of the first `keep` inputs or all, info per mapping). schemes:
    {relative name: WeightScheme} where a Linear's differs from config.weights."""
    awq = config.awq
    total = sum(x.numel() // x.shape[-1] for x in inputs)
    stats = {n: _Inputs(max(1, math.ceil(total / awq.max_tokens))) for n in names}
    hooks = [m.register_forward_hook(stats[n]) for n, m in names.items()]
    try:
        ref = run_keeping_first(lambda x: run(layer, x), inputs, keep)
    finally:
        for h in hooks:
            h.remove()
    info, input_scale = {}, {}
    for m in (c for m in arch.awq for c in expand(layer, m)):
        if not applicable(layer, m) or not all(b in names for b in m.balance):
            continue
        first = stats[m.balance[0]]
        weights = [layer.get_submodule(b).weight.float() for b in m.balance]
        scheme = schemes.get(m.balance[0], config.weights) if schemes else config.weights
        s, found = search_scales(first.tokens(), first.absmean(), weights, scheme, awq.grid)
        fold_scales(layer, m, s, arch.norm_offset)
        for b in m.balance:
            input_scale[b] = s
        info[m.prev] = {k: round(v, 6) if isinstance(v, float) else v for k, v in found.items()}
    if awq.clip:
        for n, lin in names.items():
            if n.rsplit(".", 1)[-1] in _NO_CLIP:
                continue
            x = stats[n].tokens()[: awq.clip_tokens]
            if n in input_scale:
                x = x / input_scale[n].to(x.device)
            scheme = schemes.get(n, config.weights) if schemes else config.weights
            ratio = search_clip(x, lin.weight.float(), scheme, grid=awq.clip_grid)
            lin.weight.copy_(apply_clip(lin.weight.data, ratio, scheme.group_size))
    return ref, info
