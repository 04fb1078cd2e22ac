"""KV-cache quantization: schemes as pure functions, and a transformers `Cache`.

Tensors are [batch, kv_heads, tokens, head_dim], as transformers' attention stores them.

Schemes (`KVCacheConfig.dtype`):
- `int8`: asymmetric, one fp16 scale and one uint8 zero point per token and head over
  head_dim (dynamic): 3 bytes of parameters per 64 codes, 0.523x of bf16 at head_dim 64.
- `int4`, `int2` (KIVI): keys asymmetric per channel over groups of `group` tokens
  (key outliers live in fixed channels), values asymmetric per token over groups of
  `group` channels. The newest tokens stay in full precision in a residual window: once
  it holds more than `residual` tokens, whole groups of the oldest are quantized.
- `fp8`: float8 e4m3 with one static scale per layer for K and one for V (calibrated by
  `llmzip quantize --kv-cache-dtype fp8`, exported as compressed-tensors k_scale/v_scale);
  without calibrated scales, each layer's scale is set from its first update.
Scales and minima are stored in fp16 (2 bytes, finer than bf16); 4- and 2-bit codes are packed
two and four to a byte along the last axis, so `bytes_per_token` is what memory really holds.

What attention reads: `update` appends the new tokens, quantizes whatever left the
residual window (all of them when residual is 0), and returns the dequantized quantized
part followed by the full-precision residual. So every token older than the window is
read back quantized, including tokens of the current call; decoding one token at a time
is exactly what a deployed quantized cache does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .kv_schemes import PARAM_BYTES, QUANTIZED, SCHEMES, KVScheme
from .primitives import round_up_to_dtype  # rounds a scale up, never down

KV_DTYPES = QUANTIZED  # the quantized schemes of llmzip.kv_schemes
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
PARAM_DTYPE = torch.float16  # scales and minima: 2 bytes, 4x finer than bf16 (K/V stay far below 65504)
assert torch.finfo(PARAM_DTYPE).bits // 8 == PARAM_BYTES


@dataclass(frozen=True)
class KVCacheConfig:
    dtype: str = "int8"
    residual: int = 128  # int4/int2: newest tokens kept in full precision
    group: int = 32  # int4/int2: tokens per key group, channels per value group

    def __post_init__(self):
        if self.dtype not in QUANTIZED:
            raise ValueError(f"KV cache dtype {self.dtype!r}: choose one of {', '.join(QUANTIZED)}")
        if self.residual < 0 or self.group < 1:
            raise ValueError("KV cache residual must be >= 0 and group >= 1")
        if self.kivi and self.residual % self.group:
            raise ValueError(f"KV cache residual ({self.residual}) must be a multiple of group ({self.group})")

    @property
    def scheme(self) -> KVScheme:
        return SCHEMES[self.dtype]

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def kivi(self) -> bool:
        return self.scheme.kivi

    @property
    def per_token_int8(self) -> bool:
        return self.scheme.layout == "int8-token"

    @property
    def fp8(self) -> bool:
        return self.scheme.layout == "fp8-tensor"


# ---------- pure functions ----------


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2^bits) -> uint8, 8/bits codes per byte along the last axis, LSB first."""
    if bits == 8:
        return q
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, device=q.device, dtype=torch.uint8)
    return (q << shifts).sum(-1, dtype=torch.uint8)


def unpack_codes(p: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return p
    shifts = torch.arange(0, 8, bits, device=p.device, dtype=torch.uint8)
    q = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*p.shape[:-1], -1)


def quantize_asym(x: torch.Tensor, bits: int, dim: int, dtype: torch.dtype) -> tuple:
    """Asymmetric min/max quantization sharing (scale, min) over `dim`:
    returns (codes uint8, scale, min) with x ~= codes * scale + min; scale/min in `dtype`."""
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp(min=1e-8).to(dtype)
    lo = lo.to(dtype)
    q = ((xf - lo.float()) / scale.float()).round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)
    return q, scale, lo


def dequantize_asym(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float() + lo.float()).to(dtype)


def quantize_int8(x: torch.Tensor, dim: int) -> tuple:
    """Asymmetric 8-bit with an integer zero point over `dim`: returns (codes uint8, scale
    fp16, zero uint8) with x ~= (codes - zero) * scale. The range is widened to include 0,
    so the zero point is one of the codes; the scale is rounded up to fp16, never down."""
    xf = x.float()
    lo = xf.amin(dim, keepdim=True).clamp(max=0.0)
    hi = xf.amax(dim, keepdim=True).clamp(min=0.0)
    scale = round_up_to_dtype(((hi - lo) / 255).clamp(min=1e-6), PARAM_DTYPE)
    s = scale.float()
    zero = (-lo / s).round_().clamp_(0, 255)
    q = (xf / s + zero).round_().clamp_(0, 255).to(torch.uint8)
    return q, scale, zero.to(torch.uint8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((q.float() - zero.float()) * scale.float()).to(dtype)


def quantize_keys(k: torch.Tensor, cfg: KVCacheConfig) -> dict:
    """[B, H, T, D] -> stored form. int8: per token; KIVI: per channel over groups of tokens
    (T must be a multiple of cfg.group); fp8: see quantize_fp8."""
    if cfg.per_token_int8:
        q, s, z = quantize_int8(k, -1)
        return {"q": q, "scale": s, "zero": z}
    B, H, T, D = k.shape
    g = k.reshape(B, H, T // cfg.group, cfg.group, D)
    q, s, m = quantize_asym(g, cfg.bits, 3, PARAM_DTYPE)  # one (scale, min) per group of tokens and channel
    return {"q": pack_codes(q.reshape(B, H, T, D), cfg.bits), "scale": s, "min": m}


def dequantize_keys(st: dict, cfg: KVCacheConfig, dtype: torch.dtype) -> torch.Tensor:
    if cfg.per_token_int8:
        return dequantize_int8(st["q"], st["scale"], st["zero"], dtype)
    q = unpack_codes(st["q"], cfg.bits)
    B, H, T, D = q.shape
    g = q.reshape(B, H, T // cfg.group, cfg.group, D)
    return dequantize_asym(g, st["scale"], st["min"], dtype).reshape(B, H, T, D)


def quantize_values(v: torch.Tensor, cfg: KVCacheConfig) -> dict:
    """[B, H, T, D] -> stored form: per token (int8: over D; KIVI: over groups of channels)."""
    if cfg.per_token_int8:
        return quantize_keys(v, cfg)
    B, H, T, D = v.shape
    gc = _value_group(cfg, D)
    g = v.reshape(B, H, T, D // gc, gc)
    q, s, m = quantize_asym(g, cfg.bits, 4, PARAM_DTYPE)
    return {"q": pack_codes(q.reshape(B, H, T, D), cfg.bits), "scale": s, "min": m}


def _value_group(cfg: KVCacheConfig, head_dim: int) -> int:
    """Channels per value group: cfg.group when it divides head_dim, else the whole head."""
    return cfg.scheme.value_group(cfg.group, head_dim)


def dequantize_values(st: dict, cfg: KVCacheConfig, dtype: torch.dtype) -> torch.Tensor:
    if cfg.per_token_int8:
        return dequantize_keys(st, cfg, dtype)
    q = unpack_codes(st["q"], cfg.bits)
    B, H, T, D = q.shape
    gc = D // st["scale"].shape[3]
    g = q.reshape(B, H, T, D // gc, gc)
    return dequantize_asym(g, st["scale"], st["min"], dtype).reshape(B, H, T, D)


def fp8_scale(x: torch.Tensor) -> torch.Tensor:
    """Static per-tensor scale: max |x| maps to the largest e4m3 value."""
    return (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> dict:
    return {"q": (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)}


def dequantize_fp8(st: dict, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (st["q"].float() * scale).to(dtype)


def _cat(a: dict | None, b: dict) -> dict:
    """Append stored form b to a along tokens (dim 2 of every stored tensor)."""
    return b if a is None else {k: torch.cat([a[k], b[k]], dim=2) for k in b}


def bytes_per_token(cfg: KVCacheConfig | None, kv_heads: int, head_dim: int, elem_bytes: int = 2) -> float:
    """Bytes one token's K and V take in one layer once quantized (the residual window,
    a fixed number of full-precision tokens, is not included); None: unquantized."""
    if cfg is None:
        return SCHEMES["auto"].bytes_per_token(kv_heads, head_dim, elem_bytes)
    return cfg.scheme.bytes_per_token(kv_heads, head_dim, elem_bytes, cfg.group)


# ---------- transformers Cache ----------


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's quantized K/V (see the module docstring for what attention reads)."""

    is_croppable = False

    def __init__(self, cfg: KVCacheConfig, k_scale: float | None = None, v_scale: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.cumulative_length = 0
        self.qk = self.qv = None  # stored (quantized) part
        self.k_scale = None if k_scale is None else torch.tensor(float(k_scale))
        self.v_scale = None if v_scale is None else torch.tensor(float(v_scale))

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype

    def _keep(self) -> int:
        return self.cfg.residual if self.cfg.kivi else 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        n = keys.shape[-2] - self._keep()
        if self.cfg.kivi:
            n -= n % self.cfg.group  # whole token groups only
        if n > 0:
            self._store(keys[..., :n, :], values[..., :n, :])
            keys, values = keys[..., n:, :], values[..., n:, :]
        self.keys, self.values = keys, values
        return self._read(keys, values)

    def _store(self, k, v):
        cfg = self.cfg
        if cfg.fp8:
            if self.k_scale is None:
                self.k_scale, self.v_scale = fp8_scale(k), fp8_scale(v)
            self.k_scale, self.v_scale = self.k_scale.to(k.device), self.v_scale.to(k.device)
            self.qk = _cat(self.qk, quantize_fp8(k, self.k_scale))
            self.qv = _cat(self.qv, quantize_fp8(v, self.v_scale))
            return
        self.qk = _cat(self.qk, quantize_keys(k, cfg))
        self.qv = _cat(self.qv, quantize_values(v, cfg))

    def _read(self, keys, values):
        if self.qk is None:
            return keys, values
        if self.cfg.fp8:
            dk = dequantize_fp8(self.qk, self.k_scale, self.dtype)
            dv = dequantize_fp8(self.qv, self.v_scale, self.dtype)
        else:
            dk = dequantize_keys(self.qk, self.cfg, self.dtype)
            dv = dequantize_values(self.qv, self.cfg, self.dtype)
        return torch.cat([dk, keys], dim=-2), torch.cat([dv, values], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def stored_bytes(self) -> int:
        """Bytes held right now: quantized part + full-precision residual."""
        held = [t for st in (self.qk, self.qv) if st for t in st.values()]
        held += [t for t in (self.keys, self.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def reorder_cache(self, beam_idx):
        for st in (self.qk, self.qv):
            if st:
                for k in st:
                    st[k] = st[k].index_select(0, beam_idx.to(st[k].device))
        super().reorder_cache(beam_idx)


class QuantizedKVCache(Cache):
    """A transformers Cache whose layers store K/V quantized:

        cache = llmzip.QuantizedKVCache(KVCacheConfig("int4", residual=128))
        model.generate(ids, past_key_values=cache, max_new_tokens=64)

    scales: optional [(k_scale, v_scale)] per layer for fp8 (calibrated, static).
    """

    def __init__(self, cfg: KVCacheConfig, num_layers: int | None = None, scales: list | None = None):
        self.cfg = cfg
        if scales is not None:
            layers = [QuantizedKVLayer(cfg, k, v) for k, v in scales]
            super().__init__(layers=layers)
        elif num_layers is not None:
            super().__init__(layers=[QuantizedKVLayer(cfg) for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=lambda: QuantizedKVLayer(cfg))

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers)


# ---------- FP8 scale calibration and export ----------

ATTN_NAME = "self_attn"  # where vLLM and compressed-tensors expect k_scale / v_scale


class _AbsMaxCache(DynamicCache):
    """A DynamicCache that also records max |K| and max |V| per layer into `amax`."""

    def __init__(self, amax: dict, **kwargs):
        super().__init__(**kwargs)
        self.amax = amax

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = key_states.abs().amax().item(), value_states.abs().amax().item()
        old = self.amax.get(layer_idx, (0.0, 0.0))
        self.amax[layer_idx] = (max(old[0], k), max(old[1], v))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def calibrate_fp8_scales(model, ids: torch.Tensor, progress: bool = False) -> list[tuple[float, float]]:
    """Static FP8 (e4m3) K and V scales per decoder layer: max |K|, max |V| over the
    calibration samples `ids` [samples, seq_len] (keys after RoPE, as the cache stores
    them), divided by 448 so the largest value maps to e4m3's largest."""
    from tqdm.auto import tqdm

    amax: dict[int, tuple[float, float]] = {}
    device = next(model.parameters()).device
    for row in tqdm(ids, desc="kv fp8 scales", unit="sample", disable=not progress):
        model(row.unsqueeze(0).to(device), use_cache=True, **{cache_kwarg(model): _AbsMaxCache(amax, config=model.config)})
    if not amax:
        raise ValueError("the model wrote nothing to its KV cache: cannot calibrate FP8 KV scales")
    return [(max(k, 1e-12) / FP8_MAX, max(v, 1e-12) / FP8_MAX) for k, v in (amax[i] for i in sorted(amax))]


def cache_kwarg(model) -> str:
    """The name this transformers version gives the cache argument of `model.forward`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its attention module (named `self_attn`, with `layer_idx`)."""
    found = {m.layer_idx: m for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] == ATTN_NAME and isinstance(getattr(m, "layer_idx", None), int)}
    if not found:
        raise ValueError(f"no attention modules named '{ATTN_NAME}' with a layer_idx: FP8 KV scales cannot be "
                         "attached to this architecture")
    return found


def attach_fp8_scales(model, scales: list[tuple[float, float]], dtype: torch.dtype) -> None:
    """Register `k_scale`/`v_scale` ([1], `dtype`, rounded up so no value clips) on each
    attention module, which is where compressed-tensors' export and vLLM read them."""
    mods = attention_modules(model)
    if len(mods) != len(scales):
        raise ValueError(f"{len(scales)} KV scale pairs for {len(mods)} attention layers")
    for i, (k, v) in enumerate(scales):
        for name, s in (("k_scale", k), ("v_scale", v)):
            stored = round_up_to_dtype(torch.tensor([s], dtype=torch.float32), dtype)
            home = next(itertools.chain(mods[i].parameters(), mods[i].buffers())).device
            mods[i].register_buffer(name, stored.to(home))


def attached_fp8_scales(model) -> list[tuple[float, float]] | None:
    """The (k_scale, v_scale) pairs attached to a model (see attach_fp8_scales), or None."""
    try:
        mods = attention_modules(model)
    except ValueError:
        return None
    if not all(hasattr(m, "k_scale") and hasattr(m, "v_scale") for m in mods.values()):
        return None
    return [(mods[i].k_scale.float().item(), mods[i].v_scale.float().item()) for i in sorted(mods)]
