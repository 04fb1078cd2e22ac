"""KV cache schemes: one registry that every part of llmzip reads.

The serving pool (serve/kv_pool.py), the transformers cache (llmzip.kv_cache), the CLI's
`--kv-cache-dtype` choices, `llmzip info` and `serve --engine vllm` all take a scheme's
name, bits, layout and size from here. Plain Python (no torch): the CLI imports it before
parsing. Layouts:
- "model": K/V in the model's dtype;
- "int8-token": one uint8 code per element, an fp16 scale and a uint8 zero point per token
  and head over head_dim (dynamic);
- "fp8-tensor": float8 e4m3 with one scale per layer for K and one for V (calibrated by
  `llmzip quantize --kv-cache-dtype fp8`, or set from the first update);
- "kivi": KIVI at `bits`: keys per channel over groups of `group` tokens, values per token
  over groups of `group` channels, an fp16 scale and minimum per group, codes packed.
"""

from __future__ import annotations

from dataclasses import dataclass

PARAM_BYTES = 2  # scales and minima are stored in fp16 whatever the model dtype
KIVI_GROUP = 32  # tokens per key group (and channels per value group) by default


@dataclass(frozen=True)
class KVScheme:
    name: str
    bits: int | None  # bits per stored K/V element; None: the model's dtype
    layout: str  # "model" | "int8-token" | "fp8-tensor" | "kivi" (see the module docstring)
    help: str
    page: int = 16  # serving pool: tokens per page (KIVI: its key group, so a full page quantizes)
    vllm: bool = False  # vLLM's --kv-cache-dtype has it
    calibrated: bool = False  # `llmzip quantize` can store calibrated scales for it

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def kivi(self) -> bool:
        return self.layout == "kivi"

    def value_group(self, group: int, head_dim: int) -> int:
        """KIVI: channels per value group, `group` when it divides head_dim, else the whole head."""
        g = min(group, head_dim)
        return g if head_dim % g == 0 else head_dim

    def bytes_per_token(self, kv_heads: int, head_dim: int, elem_bytes: int = 2, group: int = KIVI_GROUP) -> float:
        """Bytes one token's K and V take in one layer once stored (a KIVI residual window, a
        fixed number of full-precision tokens, is not included)."""
        if self.layout == "model":
            return float(2 * kv_heads * head_dim * elem_bytes)
        if self.layout == "fp8-tensor":
            return float(2 * kv_heads * head_dim)
        if self.layout == "int8-token":
            return float(2 * kv_heads * (head_dim + PARAM_BYTES + 1))  # codes, scale, uint8 zero point
        codes = kv_heads * head_dim * self.bits / 8
        key_params = kv_heads * head_dim * 2 * PARAM_BYTES / group  # per channel, per group of tokens
        value_params = kv_heads * (head_dim // self.value_group(group, head_dim)) * 2 * PARAM_BYTES
        return 2 * codes + key_params + value_params


SCHEMES: dict[str, KVScheme] = {s.name: s for s in (
    KVScheme("auto", None, "model", "the model's dtype", vllm=True),
    KVScheme("int8", 8, "int8-token", "int8 per token and head (0.52x of bf16 at head_dim 64)"),
    KVScheme("fp8", 8, "fp8-tensor", "float8 e4m3, one scale per layer for K and for V", vllm=True,
             calibrated=True),
    KVScheme("int4", 4, "kivi", "KIVI int4: keys per channel, values per token, groups of 32", page=KIVI_GROUP),
    KVScheme("int2", 2, "kivi", "KIVI int2: keys per channel, values per token, groups of 32", page=KIVI_GROUP),
)}
NAMES = tuple(SCHEMES)  # every scheme, "auto" (no quantization) first
QUANTIZED = tuple(n for n in NAMES if SCHEMES[n].quantized)
CALIBRATED = tuple(n for n in NAMES if SCHEMES[n].calibrated)


def get(name: str) -> KVScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"KV cache dtype {name!r}: choose one of {', '.join(NAMES)}") from None


def choices_help() -> str:
    """One line per scheme, for --help."""
    return "; ".join(f"{s.name}: {s.help}" for s in SCHEMES.values())
