"""The engine's forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

A decode step of a small model on CPU costs mostly per-operation overhead, not arithmetic:
a few rows go through ~90 tensor operations per decoder layer. This pass computes the same
function as the model's own forward with about a third fewer operations:
- q/k/v and gate/up run as one matmul each: their weights are concatenated once, and the
  model's own Linears become views into the fused tensors (no memory is duplicated; the
  model still runs on its own, e.g. for `generate`);
- RoPE rotates queries and keys in one go; RMSNorm uses torch's fused kernel (in fp32, as
  the model's own norm does);
- only the positions whose next token is sampled go through the final norm and the LM head;
- one pass takes rows with different numbers of new tokens (decode rows and prompt chunks
  of several lengths): Linears run once over all of them; attention runs per `Group` of rows
  with the same count.
The logits equal the model's own up to float rounding (fused reductions and matmuls sum in
another order), tested against it in tests/test_engine.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llmzip.kernels import registry
from llmzip.quant_linear import QuantLinear

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def lean_model(model, prepack: bool = True) -> LeanModel | None:
    """A LeanModel for `model`, or None when its architecture is not one this pass knows
    (the engine then calls the model's own forward). prepack: see LeanModel."""
    cfg = model.config
    base = getattr(model, "model", None)
    if cfg.model_type not in ARCHS or base is None or getattr(cfg, "hidden_act", "silu") != "silu":
        return None
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return None
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return None
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return None
    return LeanModel(model, prepack)


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([m(x) for m in mods], -1), or None when they cannot be
    fused (mixed types or schemes, different act-order permutations, misaligned zero points).
    The originals' tensors are re-pointed into the fused ones."""
    k = mods[0].in_features
    n = sum(m.out_features for m in mods)
    if any(m.in_features != k for m in mods) or len({m.bias is None for m in mods}) > 1:
        return None
    has_bias = mods[0].bias is not None
    if all(type(m) is nn.Linear for m in mods):
        w = mods[0].weight
        fused = nn.Linear(k, n, bias=has_bias, device="meta", dtype=w.dtype)  # no init: replaced below
        fused.weight = nn.Parameter(torch.cat([m.weight.data for m in mods]), requires_grad=False)
        if has_bias:
            fused.bias = nn.Parameter(torch.cat([m.bias.data for m in mods]), requires_grad=False)
        _repoint(mods, fused, ["weight"] + (["bias"] if has_bias else []), param=True)
        return fused.eval()
    if not all(isinstance(m, QuantLinear) for m in mods):
        return None
    s = mods[0].scheme
    if any(m.scheme != s or m.act_order != mods[0].act_order for m in mods):
        return None
    if mods[0].act_order and any(not torch.equal(m.weight_g_idx, mods[0].weight_g_idx) for m in mods):
        return None
    zero = not s.symmetric
    if zero and any(m.out_features * s.bits % 32 for m in mods[:-1]):
        return None  # zero points are packed along the output dimension
    scale = mods[0].weight_scale
    fused = QuantLinear(k, n, s, has_bias, mods[0].act_order, dtype=scale.dtype, device=scale.device)
    names = ["weight_packed", "weight_scale"] + (["weight_zero_point"] if zero else []) + (["bias"] if has_bias else [])
    with torch.no_grad():
        for name in names:
            getattr(fused, name).copy_(torch.cat([getattr(m, name) for m in mods]))
        if mods[0].act_order:
            fused.weight_g_idx.copy_(mods[0].weight_g_idx)
    _repoint(mods, fused, names, param=False)
    return fused.eval()


def _repoint(mods, fused, names: list[str], param: bool) -> None:
    """Make each original's tensors views of its rows (or packed rows) of the fused ones."""
    starts = {name: 0 for name in names}
    for m in mods:
        for name in names:
            t = getattr(m, name)
            rows = t.shape[0]
            view = getattr(fused, name).data[starts[name]:starts[name] + rows]
            starts[name] += rows
            if isinstance(t, nn.Parameter) or (param and name in ("weight", "bias")):
                setattr(m, name, nn.Parameter(view, requires_grad=False))
            else:
                setattr(m, name, view)
        if isinstance(m, QuantLinear):  # its kernel state came from the old tensors
            registry.unbind(m)


def _norm(x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """The model's RMSNorm (x in fp32, normalised, cast back, times the weight) in fewer ops.
    torch's fused rms_norm on bf16/fp16 input computes in fp32 and rounds once, which is the
    model's fp32 round trip without its two copies (bit-equal: tests/test_engine.py)."""
    eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", 1e-6)
    return mod.weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


class _Layer:
    def __init__(self, layer, hq: int, hkv: int, head_dim: int, pack=lambda m: m):
        attn, mlp = layer.self_attn, layer.mlp
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.hq, self.hkv, self.d = hq, hkv, head_dim
        self.scaling = attn.scaling
        self.qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.qkv_parts = None if self.qkv else tuple(map(pack, (attn.q_proj, attn.k_proj, attn.v_proj)))
        self.qkv = self.qkv and pack(self.qkv)
        self.o_proj, self.down = pack(attn.o_proj), pack(mlp.down_proj)
        self.inter = mlp.gate_proj.out_features
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.gate_up_parts = None if self.gate_up else tuple(map(pack, (mlp.gate_proj, mlp.up_proj)))
        self.gate_up = self.gate_up and pack(self.gate_up)

    def __call__(self, h, cos, sin, groups: list[Group], idx: int) -> torch.Tensor:
        """h: [tokens, hidden], the groups' tokens one after another (row-major in each group)."""
        T = h.shape[0]
        x = _norm(h, self.in_norm)
        if self.qkv is not None:
            qkv = self.qkv(x)
        else:
            qkv = torch.cat([m(x) for m in self.qkv_parts], dim=-1)
        qkv = qkv.view(T, self.hq + 2 * self.hkv, self.d)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm on q and k before RoPE
            qk = torch.cat([_norm(qkv[:, :self.hq], self.q_norm),
                            _norm(qkv[:, self.hq:self.hq + self.hkv], self.k_norm)], dim=1)
        else:
            qk = qkv[:, :self.hq + self.hkv]
        # RoPE, as the model's q * cos + rotate_half(q) * sin: rotate_half(x) * sin equals
        # roll(x, D/2) * sin with its first half negated (`sin` here), in fewer operations.
        qk = qk * cos + qk.roll(self.d // 2, -1) * sin
        outs = [self._attend(qk, qkv, g, idx) for g in groups]
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        h = h + self.o_proj(o)
        x = _norm(h, self.post_norm)
        if self.gate_up is not None:
            gate, up = self.gate_up(x).split(self.inter, dim=-1)
        else:
            gate, up = (m(x) for m in self.gate_up_parts)
        return h + self.down(F.silu(gate) * up)

    def _attend(self, qk, qkv, g: Group, idx: int) -> torch.Tensor:
        """Attention of one group's rows over their own K/V: [rows * q, Hq * D]."""
        rows, t, end, hq, hkv, d = g.rows, g.q, g.start + g.rows * g.q, self.hq, self.hkv, self.d
        k, v = g.cache.update_tokens(qk[g.start:end, hq:], qkv[g.start:end, hq + hkv:], idx)  # [rows, Hkv, kv_len, D]
        rep = hq // hkv
        if t == 1:  # one query per row: the group's query heads attend to their shared K/V head
            q = qk[g.start:end, :hq].view(rows, hkv, rep, d)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=self.scaling)
            return o.reshape(rows, hq * d)
        q = qk[g.start:end, :hq].view(rows, t, hq, d).transpose(1, 2)  # [rows, Hq, t, D]
        if rep > 1:
            k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(rows, hq, -1, d)
            v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(rows, hq, -1, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=self.scaling)
        return o.transpose(1, 2).reshape(rows * t, hq * d)


@dataclass
class Group:
    """Rows of one forward pass that take the same number `q` of new tokens: their tokens
    are `start .. start + rows * q` of the pass, their attention mask [rows, 1, q, kv_len]
    and their StepCache (block tables, where the new K/V go)."""

    start: int
    rows: int
    q: int
    mask: torch.Tensor
    cache: object


class LeanModel:
    """logits = lean(ids, positions, groups, last): the tokens of a pass flattened, their
    rows grouped by new-token count (each `Group` with its mask and StepCache); returns the
    logits of the tokens at indices `last` (see __call__)."""

    def __init__(self, model, prepack: bool = True):
        """prepack: dense bf16 Linears on CPU (the LM head; every Linear of an unquantized
        model) run on prepared copies of their weights (kernels/cpu_dense.py: oneDNN-prepacked
        bf16, or fp32 where the CPU has no native bf16 matmul): 1.4-2x (oneDNN) or 1.4-7x (fp32)
        faster at decode-step row counts, for a copy of those weights in memory."""
        base, cfg = model.model, model.config
        pack = partial(registry.serving_linear, prepack=prepack)  # QuantLinears: bound to their kernel, once
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, base.rotary_emb
        self.lm_head = pack(model.lm_head)
        hq = cfg.num_attention_heads
        hkv = getattr(cfg, "num_key_value_heads", None) or hq
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
        self.layers = [_Layer(layer, hq, hkv, d, pack) for layer in base.layers]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, groups: list[Group],
                 last: torch.Tensor) -> torch.Tensor:
        """ids, positions: [tokens], the groups' tokens one after another. Returns the logits
        [len(last), vocab] of the tokens at indices `last` (none when a pass only prefills
        part of a prompt: then no token is sampled)."""
        h = self.embed(ids)
        cos, sin = self.rotary(h[None], positions[None])  # [1, tokens, D]
        cos, sin = cos[0, :, None], sin[0, :, None]  # broadcast over heads in [tokens, heads, D]
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # see _Layer: RoPE with roll
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, groups, i)
        if last.numel() == 0:
            return h.new_empty(0, self.lm_head.out_features)
        return self.lm_head(_norm(h.index_select(0, last), self.norm))
