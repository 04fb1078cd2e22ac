"""serve/scheduler.py on its own (no model): admission, the passes of a step, and release."""

import pytest
import torch

from llmzip.serve.kv_pool import KVPool
from llmzip.serve.sampling import SamplingParams
from llmzip.serve.scheduler import EngineFull, PromptTooLong, Scheduler, SchedulerConfig

PAGE = 4


def scheduler(pages: int = 64, **cfg) -> Scheduler:
    pool = KVPool(1, pages, 1, 8, torch.float32, "cpu", PAGE)
    return Scheduler(pool, SchedulerConfig(**{"max_num_seqs": 4, "max_model_len": 64, "prefill_chunk": 8, **cfg}))


def submit(s: Scheduler, n: int, max_tokens: int = 4):
    return s.submit(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, temperature=0), lambda ev: None)


def test_a_mixed_pass_takes_decode_rows_and_prompt_chunks_up_to_the_budget():
    s = scheduler()
    a, b, c = submit(s, 3), submit(s, 11), submit(s, 5)
    assert s.intake() == []
    s.admit()
    assert s.prefilling == [a, b, c]
    [batch] = s.batches(mixed=True)
    # 8 prompt tokens in all, oldest first: a's 3, then 5 of b's 11; c waits for the next pass
    assert [(c_.q, [x.id for x in c_.seqs]) for c_ in batch.chunks] == [(3, [a.id]), (5, [b.id])]
    assert batch.sampled == [a]  # a's prompt is done: its first token is due
    assert s.advance(batch) == 8
    assert s.decoding == [a] and s.prefilling == [b, c]
    a.out.append(7)  # the engine sampled a's first token
    [batch] = s.batches(mixed=True)
    assert [(c_.q, c_.prefill) for c_ in batch.chunks] == [(1, False), (6, True), (2, True)]
    assert batch.sampled == [a, b]


def test_without_mixed_passes_a_prompt_chunk_and_the_decode_rows_run_apart():
    s = scheduler()
    a = submit(s, 3)
    s.intake()
    s.admit()
    passes = s.batches(mixed=False)
    first = next(passes)
    assert [c.q for c in first.chunks] == [3] and first.sampled == [a]
    s.advance(first)
    a.out.append(7)
    second = next(passes)  # computed after the first ran: a decodes in the same step
    assert [c.q for c in second.chunks] == [1] and second.sampled == [a]
    assert next(passes, None) is None


def test_admission_reserves_prompt_plus_max_tokens_and_release_returns_it():
    s = scheduler(pages=6)  # 5 usable pages of 4 tokens
    a, b = submit(s, 8, max_tokens=8), submit(s, 4, max_tokens=4)  # 4 pages, then 2 pages
    s.intake()
    s.admit()
    assert s.prefilling == [a] and list(s.waiting) == [b]  # first come, first served
    assert len(a.pages) == 4 and len(s.pool.free) == 1
    s.release(a)
    s.admit()
    assert s.prefilling == [b] and len(s.pool.free) == 3


def test_aborts_and_refusals():
    s = scheduler(max_queue=2)
    a = submit(s, 3)
    submit(s, 3)
    with pytest.raises(EngineFull):
        submit(s, 3)
    with pytest.raises(PromptTooLong):
        submit(s, 64)  # the whole context
    s.abort(a.id)
    assert s.intake() == [a]
    s.abort_all()
    assert len(s.intake()) == 2
