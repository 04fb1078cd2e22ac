"""Calibration samples: N windows of L tokens, deterministic under a seed.

The text comes from any `llmzip.data.load_text` source; the default is the built-in
"lee" news corpus, which is disjoint from the "wiki" evaluation corpus. The digest
of the token ids is recorded in the checkpoint metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from .config import ConfigError
from .data import load_text


@dataclass(frozen=True)
class CalibConfig:
    source: str = "lee"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2:
            raise ConfigError(f"calibration needs samples >= 1 and seq_len >= 2, got {self.samples} x {self.seq_len}")

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_ids(tokenizer, cfg: CalibConfig) -> tuple[torch.Tensor, str]:
    """([samples, seq_len] LongTensor, sha256 digest prefix of its bytes).

    The text is tokenized once; windows start at offsets drawn uniformly with a
    seeded generator (they may overlap when the text is short)."""
    text = load_text(cfg.source)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < cfg.seq_len:
        raise ConfigError(
            f"calibration text '{cfg.source}' has {ids.numel()} tokens, fewer than --seq-len {cfg.seq_len}"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len + 1, (cfg.samples,), generator=g)
    batch = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])
    digest = hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]
    return batch, digest
