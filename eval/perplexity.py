"""Perplexity with a fixed, stated protocol.

Protocol (also written into every result):
1. The whole text is tokenized once, without special tokens; if the tokenizer has a
   BOS token it is *not* inserted (windows start mid-text, as in most ppl tables).
2. Non-overlapping mode (default): the token stream is cut into consecutive windows
   of exactly `ctx` tokens; a trailing remainder shorter than `ctx` is dropped. Each
   window is scored on its tokens 2..ctx (the first has no context), so a window
   contributes ctx - 1 predictions.
3. Sliding mode (`stride` < ctx): windows of `ctx` tokens start every `stride`
   tokens; the first window scores all its ctx - 1 predictions, later ones only their
   last `stride` tokens, so every token is predicted once with at least
   ctx - stride tokens of context.
4. ppl = exp(sum of token NLLs / number of scored tokens), NLL in fp32 from the
   model's logits (computed in the model's dtype).
`max_windows` keeps only the first N windows, for quick comparisons.

With a quantized KV cache (`kv_cache`, llmzip.kv_cache), each window is fed in chunks
of `kv_chunk` tokens through a fresh QuantizedKVCache, so every token reads the keys
and values of earlier chunks back from the quantized cache (and, beyond the residual
window, those of its own chunk too). kv_chunk = 1 is token-by-token decoding, exactly
what a deployed cache sees; larger chunks are faster and can only be kinder to the cache
(tokens of the current chunk inside the residual window are read in full precision).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmzip.kernels.cpu_dense import fp32_products


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    ctx: int
    stride: int
    dtype: str
    seconds: float
    tokens_per_s: float
    window_ppl: list[float]
    protocol: str = "llmzip-ppl-v1: tokenize once, no BOS, windows of ctx, first token of each window unscored"
    kv_cache: str | None = None  # e.g. "int4 residual 128 group 32, chunk 16"

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, ctx: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) for each window; scored positions are
    [first_scored, end) in stream coordinates, each predicted from the tokens before."""
    if ctx < 2:
        raise ValueError(f"ctx={ctx} must be at least 2")
    stride = stride or ctx
    if not 0 < stride <= ctx:
        raise ValueError(f"stride={stride} must be in [1, ctx={ctx}]")
    if n_tokens < ctx:
        raise ValueError(f"text has {n_tokens} tokens, fewer than one window of ctx={ctx}")
    if stride == ctx:
        return [(s, s + ctx, s + 1) for s in range(0, n_tokens - ctx + 1, ctx)]
    out = [(0, ctx, 1)]
    start = stride
    while start + ctx <= n_tokens:
        out.append((start, start + ctx, start + ctx - stride))
        start += stride
    return out


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    ctx: int = 2048,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
    kv_cache=None,
    kv_chunk: int = 16,
) -> PerplexityResult:
    """Perplexity of `model` over a 1-D LongTensor of token ids (see module docstring).
    kv_cache: a llmzip.kv_cache.KVCacheConfig to read K/V through, fed kv_chunk tokens at a time."""
    spans = windows(token_ids.numel(), ctx, stride)
    if max_windows is not None:
        spans = spans[:max_windows]
    device = next(model.parameters()).device
    scales = None
    if kv_cache is not None and kv_cache.dtype == "fp8":
        from llmzip.kv_cache import attached_fp8_scales

        # the checkpoint's calibrated static scales when it has them (quantize --kv-cache-dtype fp8)
        scales = attached_fp8_scales(model)
    total_nll, total_tokens, per_window = 0.0, 0, []
    t0 = time.perf_counter()
    for start, end, first in tqdm(spans, desc=f"ppl ctx={ctx}", unit="win", disable=not progress):
        ids = token_ids[start:end].unsqueeze(0).to(device)
        logits = _logits(model, ids, kv_cache, kv_chunk, scales)[:-1]
        targets = ids[0, 1:]
        nll = F.cross_entropy(logits, targets, reduction="none")
        nll = nll[first - start - 1 :]  # logits[i] predicts token start+i+1
        total_nll += nll.sum().item()
        total_tokens += nll.numel()
        per_window.append(math.exp(nll.mean().item()))
    seconds = time.perf_counter() - t0
    mean = total_nll / total_tokens
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).replace("torch.", "")
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(spans), ctx=ctx,
        stride=stride or ctx, dtype=dtype, seconds=round(seconds, 3),
        tokens_per_s=round(sum(e - s for s, e, _ in spans) / seconds, 1), window_ppl=per_window,
        kv_cache=None if kv_cache is None else (
            f"{kv_cache.dtype}" + (f" residual {kv_cache.residual} group {kv_cache.group}" if kv_cache.kivi else "")
            + (" calibrated scales" if scales is not None else "")
            + f", chunk {kv_chunk}"),
    )


def _logits(model, ids: torch.Tensor, kv_cache, kv_chunk: int, scales=None) -> torch.Tensor:
    """fp32 logits [T, vocab] of one window, through a quantized KV cache when asked.
    bf16 products run in fp32 on CPUs without native bf16 matmuls (cpu_dense.fp32_products)."""
    with fp32_products(ids.device):
        return _window_logits(model, ids, kv_cache, kv_chunk, scales)


def _window_logits(model, ids: torch.Tensor, kv_cache, kv_chunk: int, scales=None) -> torch.Tensor:
    if kv_cache is None:
        return model(ids, use_cache=False).logits[0].float()
    from llmzip.kv_cache import QuantizedKVCache, cache_kwarg

    cache = QuantizedKVCache(kv_cache, scales=scales)
    name = cache_kwarg(model)
    parts = [model(ids[:, c:c + kv_chunk], use_cache=True, **{name: cache}).logits[0].float()
             for c in range(0, ids.shape[1], kv_chunk)]
    return torch.cat(parts)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Whole text -> 1-D LongTensor, no special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
