"""Finding the Linear layers to quantize and swapping modules in place."""

from __future__ import annotations

import re

from torch import nn

from .config import QuantConfig


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def split_targets(model: nn.Module, config: QuantConfig) -> tuple[list[str], list[str]]:
    """The model's nn.Linear layers as (quantized, ignored) names, unchecked. Besides
    config.ignore, an architecture's own never-quantized Linears (llmzip.arch) are ignored."""
    from .arch import find_arch

    arch = find_arch(getattr(getattr(model, "config", None), "model_type", None))
    always = arch.ignore if arch else ()
    quantized, ignored = [], []
    for name in linear_names(model):
        if config.is_ignored(name) or any(re.search(p, name) for p in always):
            ignored.append(name)
        else:
            quantized.append(name)
    return quantized, ignored


def targets(model: nn.Module, config: QuantConfig) -> tuple[list[str], list[str]]:
    """split_targets, and check every quantized layer against the weight scheme (raises
    ConfigError naming the layer)."""
    quantized, ignored = split_targets(model, config)
    for name in quantized:
        m = model.get_submodule(name)
        config.scheme_for(name).check_layer(name, m.out_features, m.in_features)
    return quantized, ignored
