"""Calibration samples: N windows of L tokens, deterministic under a seed.

The text comes from any `llmzip.data.load_text` source; the default is the built-in
"lee" news corpus, which is disjoint from the "wiki" evaluation corpus. With
`chat=True` the samples are conversations rendered with the tokenizer's chat template
(for chat models, whose inputs always carry role markers). The digest of the token
ids is recorded in the checkpoint metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from .config import ConfigError
from .data import load_conversations, load_text


@dataclass(frozen=True)
class CalibConfig:
    source: str = "lee"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    chat: bool = False  # render samples with the tokenizer's chat template

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2:
            raise ConfigError(f"calibration needs samples >= 1 and seq_len >= 2, got {self.samples} x {self.seq_len}")

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_ids(tokenizer, cfg: CalibConfig) -> tuple[torch.Tensor, str]:
    """([samples, seq_len] LongTensor, sha256 digest prefix of its bytes).

    Plain: the text is tokenized once; windows start at offsets drawn uniformly with a
    seeded generator (they may overlap when the text is short).
    chat: conversations (llmzip.data.load_conversations) in a seeded random order, each
    rendered with the tokenizer's chat template, are concatenated into one token stream
    that is cut the same way, so samples carry the template's role markers."""
    if cfg.chat:
        ids = _chat_stream(tokenizer, cfg)
    else:
        text = load_text(cfg.source)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                           dtype=torch.long)
    if ids.numel() < cfg.seq_len:
        raise ConfigError(
            f"calibration text '{cfg.source}' has {ids.numel()} tokens, fewer than --seq-len {cfg.seq_len}"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len + 1, (cfg.samples,), generator=g)
    batch = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])
    digest = hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]
    return batch, digest


def _chat_stream(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template: calibrate without --chat, or use a chat model's tokenizer")
    convs = load_conversations(cfg.source)
    order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    # Render only as many conversations as samples x seq_len tokens need (all, if fewer).
    budget, parts, total = cfg.samples * cfg.seq_len, [], 0
    for i in order:
        text = tokenizer.apply_chat_template(convs[i], tokenize=False)
        parts.append(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])
        total += len(parts[-1])
        if total >= budget:
            break
    return torch.tensor([t for p in parts for t in p], dtype=torch.long)
