"""Hadamard rotation of a float model, folded into its weights (QuaRot-style, offline only).

The residual stream x (row vectors) is replaced by x Q with Q = llmzip.hadamard.
random_orthogonal(hidden, seed). Every weight changes so that the model computes the same
function, and its weight matrices lose the outlier columns that make them hard to quantize:
1. Each RMSNorm's scale (offset + w; Gemma's offset is 1) is multiplied into the input
   columns of the Linears that read it (q/k/v; gate/up; the LM head for the final norm), and
   the norm's weight set so that offset + w = 1. RMSNorm(x Q) = RMSNorm(x) Q then holds,
   since Q keeps norms.
2. Embedding rows E -> E Q; readers of the stream W -> W Q (input columns); writers into it
   (o_proj, down_proj) W -> Q^T W, bias b -> b Q; the LM head W -> W Q.
3. Per head, v_proj's output rows of each KV head -> Q_h^T W and o_proj's input columns of
   each query head -> W Q_h with one head_dim rotation Q_h (seed + 1): attention mixes
   tokens, not channels, so this folds exactly, grouped-query attention included.
Tied embeddings stay tied when the final norm's scale is all ones (then E Q serves both);
otherwise the LM head is untied (its own copy: vocab x hidden more parameters in the
checkpoint), as the folded final-norm scale differs from the embedding.
Math runs in float64; weights are written back in their own dtype.

No online rotation is inserted (nothing runs at inference time), so a rotated model is a
plain transformers model and its quantized checkpoint a plain compressed-tensors one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError
from .hadamard import construction, random_orthogonal

ROTATIONS = ("hadamard",)


@dataclass(frozen=True)
class StreamMap:
    """Who reads and writes the residual stream inside one decoder layer (names relative to
    the layer). readers: (norm, Linears reading its output). writers: Linears whose output
    is added to the stream. v, o: the value and output projections."""

    readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"


_DENSE = StreamMap(
    readers=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    writers=("self_attn.o_proj", "mlp.down_proj"),
)
# model_type -> (StreamMap, norm offset). Gemma 2/3 normalise the block outputs before the
# residual add (post-norms), which a rotation of the stream does not commute with.
STREAMS = {"llama": (_DENSE, 0.0), "mistral": (_DENSE, 0.0), "qwen2": (_DENSE, 0.0), "qwen3": (_DENSE, 0.0),
           "gemma": (_DENSE, 1.0)}


class RotationError(ConfigError):
    """The model cannot be rotated exactly; the message says why and what to use instead."""


def _scale(norm: nn.Module, offset: float) -> torch.Tensor:
    return offset + norm.weight.data.double()


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def _read(model: nn.Module, name: str, scale: torch.Tensor, q: torch.Tensor) -> None:
    """A Linear reading the (normed) stream: W -> (W diag(scale)) Q."""
    lin = model.get_submodule(name)
    _set(lin.weight, (lin.weight.data.double() * scale) @ q)


def _write(model: nn.Module, name: str, q: torch.Tensor) -> None:
    """A Linear adding to the stream: W -> Q^T W, b -> b Q."""
    lin = model.get_submodule(name)
    _set(lin.weight, q.T @ lin.weight.data.double())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.data.double() @ q)


def _heads(model: nn.Module, layer: str, m: StreamMap, qh: torch.Tensor) -> None:
    """v rows of every KV head -> Q_h^T W_h (bias b_h Q_h); o columns of every head -> W_h Q_h."""
    hd = qh.shape[0]
    v, o = model.get_submodule(f"{layer}.{m.v}"), model.get_submodule(f"{layer}.{m.o}")
    w = v.weight.data.double().reshape(-1, hd, v.in_features)
    _set(v.weight, torch.einsum("dk,hdi->hki", qh, w).reshape(v.weight.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.data.double().reshape(-1, hd) @ qh).reshape(-1))
    w = o.weight.data.double().reshape(o.out_features, -1, hd)
    _set(o.weight, (w @ qh).reshape(o.weight.shape))


def _check(model: nn.Module) -> tuple[StreamMap, float]:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in STREAMS:
        raise RotationError(
            f"--rotate hadamard does not know architecture '{model_type}' (it folds exactly into: "
            f"{', '.join(sorted(STREAMS))}); quantize without --rotate")
    if any(p.is_meta for p in model.parameters()):
        raise RotationError("rotation needs every weight in memory: load the whole model first")
    return STREAMS[model_type]


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> dict:
    """Rotate `model` (a transformers causal LM) in place; it computes the same function.

    Returns a report: {"kind", "seed", "hidden", "construction", "head_dim",
    "head_construction", "untied"}.
    """
    stream, offset = _check(model)
    cfg = model.config
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    q = random_orthogonal(hidden, seed)
    qh = random_orthogonal(head_dim, seed + 1)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    final = base.norm
    tied = head is not None and head.weight is embed.weight
    final_scale = _scale(final, offset)
    untie = tied and not bool(torch.all(final_scale == 1))
    if untie:
        head.weight = nn.Parameter(embed.weight.data.clone(), requires_grad=False)
        cfg.tie_word_embeddings = False
        if hasattr(cfg, "get_text_config"):
            cfg.get_text_config().tie_word_embeddings = False
        tied = False
    prefix = next(n for n, mod in model.named_modules() if mod is base.layers)
    for i in range(len(base.layers)):
        layer = f"{prefix}.{i}"
        for norm_name, readers in stream.readers:
            norm = model.get_submodule(f"{layer}.{norm_name}")
            scale = _scale(norm, offset)
            for r in readers:
                _read(model, f"{layer}.{r}", scale, q)
            norm.weight.data.fill_(1.0 - offset)
        for w in stream.writers:
            _write(model, f"{layer}.{w}", q)
        _heads(model, layer, stream, qh)
    _set(embed.weight, embed.weight.data.double() @ q)
    if head is not None and not tied:
        _set(head.weight, (head.weight.data.double() * final_scale) @ q)
    final.weight.data.fill_(1.0 - offset)
    return {"kind": "hadamard", "seed": seed, "hidden": hidden, "construction": construction(hidden),
            "head_dim": head_dim, "head_construction": construction(head_dim), "untied": untie}
