"""Architecture facts, as data: where the decoder layers live.

Every model type listed here keeps its decoder layers in `model.layers` (an
nn.ModuleList of `num_hidden_layers` blocks, each taking hidden states and returning
hidden states). To add an architecture, add its `model_type` with the dotted path of
its layer list.
"""

from __future__ import annotations

from torch import nn

LAYERS_PATH = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
}


class UnsupportedArchitecture(ValueError):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LAYERS_PATH:
        raise UnsupportedArchitecture(
            f"calibrated quantization does not know architecture '{model_type}' yet; supported: "
            f"{', '.join(sorted(LAYERS_PATH))}. Add its layer path to llmzip/arch.py, or use --method rtn"
        )
    return model.get_submodule(LAYERS_PATH[model_type])
