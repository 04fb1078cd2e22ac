import math

import pytest
import torch
from torch import nn

from llmzip.eval.perplexity import perplexity, windows

PPL_RTOL = 1e-5  # ppl and nll of a model with known probabilities vs the closed form


class _Uniform(nn.Module):
    """Predicts every token with equal probability: ppl must equal the vocab size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab) + self.w})()


class _Copy(nn.Module):
    """Puts probability p on 'next token = current token + 1', the rest spread evenly."""

    def __init__(self, vocab, p):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        rest = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*ids.shape, self.vocab), rest)
        probs.scatter_(-1, ((ids + 1) % self.vocab).unsqueeze(-1), self.p)
        return type("Out", (), {"logits": probs.log()})()


def test_windows_non_overlapping_drop_remainder():
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 5)]


def test_windows_sliding_scores_each_token_once():
    spans = windows(20, 8, stride=4)
    scored = [t for _, e, f in spans for t in range(f, e)]
    assert scored == list(range(1, 20))
    assert all(f - s >= 8 - 4 for s, e, f in spans[1:])


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(10, 2048)


def test_uniform_model_has_ppl_equal_to_vocab():
    res = perplexity(_Uniform(97), torch.randint(0, 97, (1000,)), ctx=100, progress=False)
    assert res.windows == 10 and res.tokens == 10 * 99
    assert res.ppl == pytest.approx(97, rel=PPL_RTOL)


@pytest.mark.parametrize("stride", [None, 25])
def test_known_model_matches_closed_form(stride):
    vocab, p = 50, 0.9
    ids = torch.arange(1000) % vocab  # always follows the +1 rule
    res = perplexity(_Copy(vocab, p), ids, ctx=100, stride=stride, max_windows=6, progress=False)
    assert res.ppl == pytest.approx(1 / p, rel=PPL_RTOL)
    assert res.nll == pytest.approx(-math.log(p), rel=PPL_RTOL)
    assert res.windows == 6
