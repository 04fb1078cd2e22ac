"""Sampling parameters and batched sampling for the serving engine.

All rows of a decode step are processed together: penalties, temperature, top-k and
top-p are tensor operations over [rows, vocab]. Randomness comes from one
`torch.Generator` per sequence (seeded from the request's `seed`), drawn as Gumbel
noise, so a seeded request samples the same tokens whatever else is in the batch.
Temperature 0 is greedy: the argmax of the fp32 logits, like `model.generate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("llmzip.serve")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and the top k
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 turns it off)")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("top logprobs must be between 0 and 20")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]  # per row: (chosen logprob, top k) or None


def sample(logits: torch.Tensor, params: list[SamplingParams], history: list[list[int]],
           generators: list[torch.Generator]) -> Sampled:
    """One token per row. logits: [rows, vocab] (any float dtype); history: the tokens each
    row generated so far (for presence/frequency penalties)."""
    logits = logits.float()
    rows, vocab = logits.shape
    raw_lp = torch.log_softmax(logits, -1) if any(p.logprobs is not None for p in params) else None
    penalize = [i for i, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and history[i]]
    if penalize:
        logits = logits.clone()
        for i in penalize:
            counts = torch.bincount(torch.tensor(history[i], device=logits.device), minlength=vocab).float()
            logits[i] -= params[i].frequency_penalty * counts + params[i].presence_penalty * (counts > 0).float()
    chosen = logits.argmax(-1)
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        idx = torch.tensor(rand, device=logits.device)
        sub = logits[idx] / torch.tensor([params[i].temperature for i in rand], device=logits.device)[:, None]
        sub = _top_k_top_p(sub, [params[i].top_k for i in rand], [params[i].top_p for i in rand])
        u = torch.stack([torch.rand(vocab, generator=generators[i]) for i in rand]).to(logits.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        chosen[idx] = (sub + gumbel).argmax(-1)
    tokens = chosen.tolist()
    lps = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            lps.append(None)
            continue
        top = []
        if p.logprobs:
            v, t = raw_lp[i].topk(p.logprobs)
            top = list(zip(t.tolist(), v.tolist()))
        lps.append((raw_lp[i, tokens[i]].item(), top))
    return Sampled(tokens, lps)


def sample_each(logits: torch.Tensor, params: list[SamplingParams], history: list[list[int]],
                generators: list[torch.Generator]) -> Sampled:
    """`sample`, and when that fails, each row alone: a row that fails again gets token None
    (the engine ends only its sequence), the others their tokens (one row's bad parameters
    must not fail the whole batch)."""
    try:
        return sample(logits, params, history, generators)
    except Exception:
        log.exception("sampling a batch of %d rows failed; sampling each row alone", len(params))
    tokens, lps = [], []
    for i in range(len(params)):
        try:
            one = sample(logits[i:i + 1], params[i:i + 1], history[i:i + 1], generators[i:i + 1])
            tokens.append(one.tokens[0])
            lps.append(one.logprobs[0])
        except Exception:
            log.exception("sampling row %d failed", i)
            tokens.append(None)
            lps.append(None)
    return Sampled(tokens, lps)


def _top_k_top_p(logits: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf (the best token always stays)."""
    if not any(ks) and all(p >= 1 for p in ps):
        return logits
    srt, order = logits.sort(-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None]
    k = torch.tensor([k if k > 0 else vocab for k in ks], device=logits.device)[:, None]
    drop = rank >= k
    probs = torch.softmax(srt.masked_fill(drop, float("-inf")), -1)
    before = probs.cumsum(-1) - probs  # mass of the better tokens
    drop |= before >= torch.tensor(ps, device=logits.device)[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
