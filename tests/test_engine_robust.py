"""Serving engine, hostile cases on a tiny random Llama: prompts around every prefill-chunk
boundary (alone and beside decoding requests), and one sequence's failure in sampling or
detokenizing ending only that sequence."""

import pytest
import torch
from helpers import tiny_llama

from llmzip.serve import sampling
from llmzip.serve.detokenize import Detokenizer
from llmzip.serve.engine import Engine, EngineConfig
from llmzip.serve.sampling import SamplingParams

CONTEXT = 2048
CHUNK = 512  # EngineConfig.prefill_chunk's default
MAX_TOKENS = 6
LENGTHS = [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, CONTEXT - MAX_TOKENS]


class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model():
    # float64: a random model's logits are near-flat (top two 5e-4 apart after 1025 tokens), and in
    # fp32 the summation order of a chunked prefill vs generate's one pass can flip such a tie.
    m = tiny_llama(dtype=torch.float64, max_position_embeddings=CONTEXT)
    m.config.eos_token_id = m.generation_config.eos_token_id = None
    return m


def greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def tokens(events):
    return [t for e in events for t in e.tokens]


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n, forward", [(n, "lean") for n in LENGTHS] + [(CHUNK + 1, "model")])
def test_long_prompts_alone_and_beside_decoding_requests_equal_generate(model, n, forward):
    """A step that prefills only part of a prompt samples nothing (the lean pass once failed
    on its empty index list for every prompt over 512 tokens on an idle server). Greedy
    tokens equal model.generate's exactly, alone and with two short requests decoding.
    The model's own forward (one prefill chunk per step) is checked once: it is slow here."""
    long, short = prompt(n, n), [prompt(5, 1), prompt(9, 2)]
    want = greedy(model, long, MAX_TOKENS)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=4, max_model_len=CONTEXT, forward=forward))
    alone = []
    eng.submit(long, params, alone.append)
    eng.run_until_done()
    assert tokens(alone) == want and alone[-1].finish_reason == "length"

    side = [[] for _ in short]
    for p, ev in zip(short, side):
        eng.submit(p, SamplingParams(max_tokens=3 * MAX_TOKENS, temperature=0), ev.append)
    eng.step()  # the short ones are decoding when the long one arrives
    beside = []
    eng.submit(long, params, beside.append)
    eng.run_until_done()
    assert tokens(beside) == want
    assert [tokens(ev) for ev in side] == [greedy(model, p, 3 * MAX_TOKENS) for p in short]
    assert len(eng.pool.free) == eng.pool.num_pages - 1  # every page back


def test_a_failure_sampling_one_sequence_ends_only_that_sequence(model, monkeypatch):
    """A row whose sampling raises (injected: top_k 7 marks it) ends with "error"; the rows
    sampled beside it in the same steps finish with their greedy tokens."""
    real = sampling.sample

    def poisoned(logits, params, history, generators):
        if any(p.top_k == 7 for p in params):
            raise ValueError("injected")
        return real(logits, params, history, generators)

    monkeypatch.setattr(sampling, "sample", poisoned)  # what sampling.sample_each calls
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=4, max_model_len=128))
    ps = [prompt(7, 3), prompt(12, 4), prompt(4, 5)]
    runs = [[] for _ in ps]
    for i, (p, ev) in enumerate(zip(ps, runs)):
        eng.submit(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, top_k=7 if i == 1 else 0), ev.append)
    eng.run_until_done()
    assert [ev[-1].finish_reason for ev in runs] == ["length", "error", "length"]
    assert tokens(runs[0]) == greedy(model, ps[0], MAX_TOKENS) and tokens(runs[2]) == greedy(model, ps[2], MAX_TOKENS)
    assert eng.stats["failed"] == 1 and eng.stats["finished"] == 2
    assert len(eng.pool.free) == eng.pool.num_pages - 1


@pytest.mark.parametrize("at", [1, MAX_TOKENS])  # mid-stream, and while finishing ("length" decodes the tail)
def test_a_failure_detokenizing_one_sequence_ends_only_that_sequence(model, monkeypatch, at):
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=4, max_model_len=128))
    ps = [prompt(7, 6), prompt(12, 7), prompt(4, 8)]
    runs = [[] for _ in ps]
    ids = [eng.submit(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), ev.append) for p, ev in zip(ps, runs)]
    real = Detokenizer.text

    def poisoned(self, seq, ids_=None):
        if seq.id == ids[1] and len(seq.out) >= at:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, seq, ids_)

    monkeypatch.setattr(Detokenizer, "text", poisoned)
    eng.run_until_done()
    assert [ev[-1].finish_reason for ev in runs] == ["length", "error", "length"]
    assert tokens(runs[0]) == greedy(model, ps[0], MAX_TOKENS) and tokens(runs[2]) == greedy(model, ps[2], MAX_TOKENS)
    assert len(eng.pool.free) == eng.pool.num_pages - 1
