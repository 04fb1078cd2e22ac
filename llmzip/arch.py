"""Architecture facts, as data: where decoder layers live and how AWQ may smooth them.

An AWQ mapping (prev, balance, follow) says: the output of module `prev` (a norm, or
a Linear) is the input of every Linear in `balance`, so input channel j of the balance
layers can be scaled by s_j if channel j of prev's output is divided by s_j. `follow`
lists other readers of prev's output that are not quantized (an MoE router), whose
input columns are scaled too so the float model's function is unchanged. Names are
relative to one decoder layer; `*` in a name stands for every expert index (a mapping
whose `prev` has a `*` is applied once per expert). A mapping whose shapes do not line
up in a given model (e.g. v_proj -> o_proj under grouped-query attention) is skipped
at run time.

Mixture-of-experts models also name their experts' (gate, up, down) Linears as the
original checkpoints spell them (llmzip.moe splits transformers' fused experts into
those), and Linears that must stay in full precision (Qwen2-MoE's one-output shared
expert gate, which vLLM loads as a plain Linear).

To add an architecture: add its `model_type` with its layer path and mappings.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Smooth:
    prev: str
    balance: tuple[str, ...]
    follow: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arch:
    layers: str = "model.layers"
    awq: tuple[Smooth, ...] = ()
    norm_offset: float = 0.0  # RMSNorm computes x * (offset + weight): Gemma uses 1
    experts: tuple[str, str, str] | None = None  # MoE: an expert's (gate, up, down) Linear names
    ignore: tuple[str, ...] = ()  # regexes of Linears never quantized


_ATTN = Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
_VO = Smooth("self_attn.v_proj", ("self_attn.o_proj",))
_MLP_IN = Smooth("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
_MLP_OUT = Smooth("mlp.up_proj", ("mlp.down_proj",))
LLAMA = Arch(awq=(_ATTN, _VO, _MLP_IN, _MLP_OUT))
GEMMA2 = Arch(awq=(_ATTN, _VO, Smooth("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _MLP_OUT),
              norm_offset=1.0)



def _moe(gate: str, up: str, down: str, shared: bool = False) -> Arch:
    shared_in = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj") if shared else ()
    mlp_in = Smooth("post_attention_layernorm", (f"mlp.experts.*.{gate}", f"mlp.experts.*.{up}", *shared_in),
                    follow=("mlp.gate", "mlp.shared_expert_gate") if shared else ("mlp.gate",))
    per_expert = Smooth(f"mlp.experts.*.{up}", (f"mlp.experts.*.{down}",))
    shared_out = (Smooth("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),) if shared else ()
    # The dense mappings serve dense layers of the same model (Qwen-MoE's mlp_only_layers).
    return Arch(awq=(_ATTN, _VO, mlp_in, per_expert, *shared_out, _MLP_IN, _MLP_OUT), experts=(gate, up, down),
                ignore=(r"(^|\.)shared_expert_gate$",) if shared else ())


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
    # Mixture of experts.
    "mixtral": _moe("w1", "w3", "w2"),
    "qwen2_moe": _moe("gate_proj", "up_proj", "down_proj", shared=True),
    "qwen3_moe": _moe("gate_proj", "up_proj", "down_proj"),
}


class UnsupportedArchitecture(UserError):
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


def find_arch(model_type: str | None) -> Arch | None:
    """The Arch for `model_type`, or None for architectures only RTN can handle."""
    return ARCHS.get(model_type)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)
