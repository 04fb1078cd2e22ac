"""KL divergence of a (quantized) model's next-token distribution from its base model's.

Protocol: the windows of the perplexity protocol (llmzip.eval.perplexity: tokenize once,
no BOS, non-overlapping windows of `ctx`, first token of each window unscored). For every
scored position both models see the same tokens; with P the base model's and Q the
other model's next-token distribution (softmax of the logits, in fp32):

    KLD = sum_v P(v) * (log P(v) - log Q(v))        (nats, >= 0, 0 iff P == Q)

Reported over all scored tokens: mean, median, 90/99/99.9th percentiles and max;
top-1 agreement (argmax Q == argmax P); both perplexities and their ratio. This is
the statistic llama.cpp's `perplexity --kl-divergence` reports, so numbers compare.

Both models run window by window in one pass; only the per-token KLD values (4 bytes
per token) are kept, never the logits of the whole text.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmzip.kernels.cpu_dense import fp32_products

from .perplexity import windows


@dataclass
class KLDResult:
    mean_kld: float
    median_kld: float
    p90_kld: float
    p99_kld: float
    p999_kld: float
    max_kld: float
    top1_agreement: float
    base_ppl: float
    ppl: float
    ppl_ratio: float
    tokens: int
    windows: int
    ctx: int
    seconds: float
    window_ppl: list[float]
    base_window_ppl: list[float]
    protocol: str = "llmzip-kld-v1: llmzip-ppl-v1 windows; KL(P_base || Q) per scored token, fp32 softmax"

    def to_dict(self) -> dict:
        return asdict(self)


def token_kld(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, P = softmax(base_logits), Q = softmax(logits), in fp32."""
    logp = F.log_softmax(base_logits.float(), dim=-1)
    logq = F.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def kl_divergence(base, model, token_ids: torch.Tensor, ctx: int = 2048, max_windows: int | None = None,
                  progress: bool = True) -> KLDResult:
    """KLD of `model` from `base` over a 1-D LongTensor of token ids (module docstring)."""
    spans = windows(token_ids.numel(), ctx)
    if max_windows is not None:
        spans = spans[:max_windows]
    klds, agree, nll_base, nll, win, base_win = [], 0, 0.0, 0.0, [], []
    t0 = time.perf_counter()
    for start, end, first in tqdm(spans, desc=f"kld ctx={ctx}", unit="win", disable=not progress):
        ids = token_ids[start:end].unsqueeze(0)
        with fp32_products(_device(base)):  # bf16 products in fp32 on CPUs without native bf16
            p = base(ids.to(_device(base)), use_cache=False).logits[0, :-1].float().cpu()
        with fp32_products(_device(model)):
            q = model(ids.to(_device(model)), use_cache=False).logits[0, :-1].float().cpu()
        keep = slice(first - start - 1, None)  # logits[i] predicts token start + i + 1
        p, q, targets = p[keep], q[keep], ids[0, 1:][keep]
        klds.append(token_kld(p, q))
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        nb, nq = F.cross_entropy(p, targets, reduction="sum").item(), F.cross_entropy(q, targets, reduction="sum").item()
        nll_base, nll = nll_base + nb, nll + nq
        base_win.append(math.exp(nb / len(targets)))
        win.append(math.exp(nq / len(targets)))
    k = torch.cat(klds).double()
    n = k.numel()
    qs = torch.quantile(k, torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=k.dtype)).tolist()
    base_ppl, ppl = math.exp(nll_base / n), math.exp(nll / n)
    return KLDResult(
        mean_kld=k.mean().item(), median_kld=qs[0], p90_kld=qs[1], p99_kld=qs[2], p999_kld=qs[3],
        max_kld=k.max().item(), top1_agreement=agree / n, base_ppl=base_ppl, ppl=ppl, ppl_ratio=ppl / base_ppl,
        tokens=n, windows=len(spans), ctx=ctx, seconds=round(time.perf_counter() - t0, 3),
        window_ppl=win, base_window_ppl=base_win,
    )
