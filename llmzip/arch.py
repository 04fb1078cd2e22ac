"""Architecture facts, as data: where decoder layers live and how AWQ may smooth them.

An AWQ mapping (prev, balance) says: the output of module `prev` (a norm, or a
Linear) is the input of every Linear in `balance`, so input channel j of the balance
layers can be scaled by s_j if channel j of prev's output is divided by s_j. Names
are relative to one decoder layer. A mapping whose shapes do not line up in a given
model (e.g. v_proj -> o_proj under grouped-query attention) is skipped at run time.

To add an architecture: add its `model_type` with its layer path and mappings.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Smooth:
    prev: str
    balance: tuple[str, ...]


@dataclass(frozen=True)
class Arch:
    layers: str = "model.layers"
    awq: tuple[Smooth, ...] = ()
    norm_offset: float = 0.0  # RMSNorm computes x * (offset + weight): Gemma uses 1


_ATTN = Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
_VO = Smooth("self_attn.v_proj", ("self_attn.o_proj",))
_MLP_IN = Smooth("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
_MLP_OUT = Smooth("mlp.up_proj", ("mlp.down_proj",))
LLAMA = Arch(awq=(_ATTN, _VO, _MLP_IN, _MLP_OUT))
GEMMA2 = Arch(awq=(_ATTN, _VO, Smooth("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _MLP_OUT),
              norm_offset=1.0)

ARCHS = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": Arch(awq=LLAMA.awq, norm_offset=1.0),
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    # Fused projections: only the norms can be smoothed into them.
    "phi3": Arch(awq=(Smooth("input_layernorm", ("self_attn.qkv_proj",)),
                      Smooth("post_attention_layernorm", ("mlp.gate_up_proj",)))),
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_of(model: nn.Module) -> Arch:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedArchitecture(
            f"calibrated quantization does not know architecture '{model_type}' yet; supported: "
            f"{', '.join(sorted(ARCHS))}. Add it to llmzip/arch.py (layer path and AWQ mappings), "
            "or use --method rtn"
        )
    return ARCHS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)
