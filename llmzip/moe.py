"""Mixture-of-experts blocks as plain Linears, so every expert quantizes like a dense MLP.

transformers >= 5 stores a block's experts fused: `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I] parameters of one module. `unfuse_experts` replaces each such
module by `LinearExperts`, which holds one small MLP (three nn.Linear) per expert and
computes the same function. From there the calibration hooks, GPTQ, AWQ, QuantLinear
and the checkpoint writer treat experts like any other Linear, and the checkpoint
stores them per expert (`experts.{e}.{gate,up,down}` under the checkpoint's original
names), which is the layout vLLM's compressed-tensors MoE loader reads.

During calibration an MoE layer can route *every* token through *every* expert
(`calibrate_all`): each expert then sees the whole calibration set, so rarely chosen
experts get a full-rank Hessian; only the routed tokens contribute to the output, so
the layer still computes exactly what the model computes. The number of tokens the
router actually sent to each expert is counted and reported.
"""

from __future__ import annotations

import torch
from torch import nn


class Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), with the checkpoint's own Linear names."""

    def __init__(self, hidden: int, inter: int, act, names: tuple[str, str, str], dtype=None, device=None):
        super().__init__()
        self.names = names
        gate, up, down = names
        kw = dict(bias=False, dtype=dtype, device=device)
        setattr(self, gate, nn.Linear(hidden, inter, **kw))
        setattr(self, up, nn.Linear(hidden, inter, **kw))
        setattr(self, down, nn.Linear(inter, hidden, **kw))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class LinearExperts(nn.ModuleList):
    """Drop-in replacement for a fused experts module: forward(hidden, top_k_index, top_k_weights)."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.calibrate_all = False
        self.register_buffer("routed_tokens", torch.zeros(len(experts), dtype=torch.long), persistent=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)
            self.routed_tokens[e] += tok.numel()
            if self.calibrate_all:
                y = expert(hidden_states)[tok]
            elif tok.numel():
                y = expert(hidden_states[tok])
            else:
                continue
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _is_fused(mod: nn.Module) -> bool:
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3
            and getattr(mod, "act_fn", None) is not None)


@torch.no_grad()
def unfuse_experts(model: nn.Module, names: tuple[str, str, str]) -> list[str]:
    """Replace every fused experts module of `model` by LinearExperts, in place.

    names: the checkpoint's Linear names for (gate, up, down) of one expert, e.g.
    ("w1", "w3", "w2") for Mixtral. Works on meta tensors too (for loading).
    Returns the names of the replaced modules."""
    replaced = []
    for name, mod in list(model.named_modules()):
        if not _is_fused(mod):
            continue
        if getattr(mod, "has_bias", False) or getattr(mod, "gate_up_proj_bias", None) is not None:
            raise NotImplementedError(f"{name}: experts with biases are not supported yet")
        gu, down = mod.gate_up_proj, mod.down_proj
        n_exp, two_inter, hidden = gu.shape
        inter = two_inter // 2
        experts = []
        for e in range(n_exp):
            ex = Expert(hidden, inter, mod.act_fn, names, dtype=gu.dtype, device=gu.device)
            g, u, d = (getattr(ex, n) for n in names)
            if gu.device.type != "meta":
                g.weight.copy_(gu[e, :inter])
                u.weight.copy_(gu[e, inter:])
                d.weight.copy_(down[e])
            experts.append(ex)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LinearExperts(experts))
        replaced.append(name)
    return replaced


def expert_token_counts(layer: nn.Module) -> dict[str, list[int]]:
    """{module name: tokens routed to each expert} for the LinearExperts in `layer`."""
    return {n: m.routed_tokens.tolist() for n, m in layer.named_modules() if isinstance(m, LinearExperts)}


class calibrating_all_experts:
    """Context manager: route every token through every expert of `module` (see module doc)
    and count routed tokens from zero."""

    def __init__(self, module: nn.Module):
        self.experts = [m for m in module.modules() if isinstance(m, LinearExperts)]

    def __enter__(self):
        for m in self.experts:
            m.calibrate_all = True
            m.routed_tokens.zero_()
        return self

    def __exit__(self, *exc):
        for m in self.experts:
            m.calibrate_all = False


def prepare_experts(model: nn.Module) -> list[str]:
    """Unfuse the experts of a known MoE architecture (see llmzip.arch); raise
    UnsupportedArchitecture for fused experts of an architecture llmzip does not know."""
    from .arch import ARCHS, UnsupportedArchitecture, find_arch

    if not any(_is_fused(m) for m in model.modules()):
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = find_arch(model_type)
    if arch is None or arch.experts is None:
        moe = sorted(k for k, a in ARCHS.items() if a.experts)
        raise UnsupportedArchitecture(
            f"'{model_type}' stores mixture-of-experts weights fused, and llmzip does not know its expert "
            f"layout; supported MoE architectures: {', '.join(moe)}. Add `experts=(gate, up, down)` names "
            "for it in llmzip/arch.py"
        )
    return unfuse_experts(model, arch.experts)
