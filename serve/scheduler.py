"""What the engine runs next: queues, admission, KV pages and slots, aborts.

A request becomes a `Sequence`. It waits in `waiting` until a running place and the KV pages
for prompt + max_tokens are free (reserved up front: a running sequence never waits for
memory and nothing is ever preempted), then prefills its prompt in chunks (`prefilling`) and
decodes (`decoding`) until the engine finishes it.

Each engine step asks for batches, one per forward pass. A `Batch` is a list of `Chunk`s:
rows that take the same number of new tokens. With a runner that takes mixed passes
(serve/runner.py) one batch holds every decoding row's next token plus the next prompt
chunks of the prefilling sequences, oldest first, up to `prefill_chunk` prompt tokens in all;
otherwise the oldest prefilling sequence's next chunk is one batch and the decode rows another.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .kv_pool import KVPool
from .sampling import SamplingParams


class EngineFull(RuntimeError):
    """The waiting queue is full: the caller should answer 503 and the client retry."""


class PromptTooLong(ValueError):
    pass


@dataclass(eq=False)  # one request: compared (in, remove) by identity
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    emit: Callable  # (Event) -> None, see serve/engine.py
    out: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    slot: int = -1  # KIVI pools: the residual slot holding this sequence's open page
    pos: int = 0  # tokens already in the KV pool
    sent: int = 0  # characters of text already emitted
    text: str = ""  # out[:read_offset] decoded (see serve/detokenize.py)
    prefix_offset: int = 0
    read_offset: int = 0
    finished: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    pending_lp: list = field(default_factory=list)

    @property
    def next_due(self) -> int:
        """Tokens that must be in the KV pool before the next token can be sampled."""
        return len(self.prompt) + len(self.out)


@dataclass
class Chunk:
    """Rows of one pass that each take `q` new tokens: `tokens[r]` for `seqs[r]`, at
    positions seqs[r].pos onward. `due[r]`: row r's last token yields its next token."""

    seqs: list[Sequence]
    tokens: list[list[int]]
    prefill: bool  # prompt tokens (counted as such), or one decode token per row

    def __post_init__(self):
        self.q = len(self.tokens[0])
        self.due = [s.pos + self.q == s.next_due for s in self.seqs]

    def positions(self) -> torch.Tensor:
        """[rows, q] positions of the new tokens."""
        return torch.tensor([s.pos for s in self.seqs])[:, None] + torch.arange(self.q)


@dataclass
class Batch:
    """One forward pass: its chunks, and the sequences to sample, in row order."""

    chunks: list[Chunk]

    @property
    def sampled(self) -> list[Sequence]:
        return [s for c in self.chunks for s, due in zip(c.seqs, c.due) if due]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8
    max_model_len: int = 2048
    prefill_chunk: int = 512
    max_queue: int = 256


class Scheduler:
    """Owns the queues and the pool's pages and slots. `submit`, `abort` and `abort_all` may
    be called from any thread; everything else runs in the engine's loop."""

    def __init__(self, pool: KVPool, config: SchedulerConfig):
        self.pool, self.config = pool, config
        self._ids = itertools.count(1)
        self.lock = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._aborts: set[int] = set()
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []

    # -- any thread --------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable) -> Sequence:
        if not prompt:
            raise PromptTooLong("the prompt is empty")
        cfg = self.config
        need = len(prompt) + params.max_tokens
        if len(prompt) >= cfg.max_model_len:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens; this server's context is "
                                f"{cfg.max_model_len} tokens (--max-model-len)")
        if min(need, cfg.max_model_len) > self.pool.capacity_tokens:
            raise PromptTooLong(f"prompt + max_tokens need {need} tokens of KV cache; the pool holds "
                                f"{self.pool.capacity_tokens}")
        seq = Sequence(next(self._ids), list(prompt), params, emit)
        seq.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                      else int(torch.randint(2**62, (1,)).item()))
        with self.lock:
            if len(self._incoming) + len(self.waiting) >= cfg.max_queue:
                raise EngineFull(f"{cfg.max_queue} requests are already waiting")
            self._incoming.append(seq)
            self.lock.notify()
        return seq

    def abort(self, seq_id: int) -> None:
        with self.lock:
            self._aborts.add(seq_id)
            self.lock.notify()

    def abort_all(self) -> None:
        with self.lock:
            seqs = itertools.chain(self._incoming, self.waiting, self.prefilling, self.decoding)
            self._aborts.update(s.id for s in seqs)
            self.lock.notify()

    def idle(self) -> bool:
        """Nothing to do (call with `lock` held)."""
        return not (self._incoming or self._aborts or self.waiting or self.prefilling or self.decoding)

    def waiting_count(self) -> int:
        with self.lock:
            return len(self._incoming) + len(self.waiting)

    # -- engine loop -------------------------------------------------------------
    def intake(self) -> list[Sequence]:
        """Move new requests into the waiting queue; return the sequences to abort."""
        with self.lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        return [s for s in itertools.chain(self.waiting, self.prefilling, self.decoding) if s.id in aborts]

    def admit(self) -> None:
        """Start waiting sequences, first come first served, while places and pages last."""
        while self.waiting and self.running < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self.pool.pages_for(min(len(seq.prompt) + seq.params.max_tokens, self.config.max_model_len))
            if n > len(self.pool.free):
                break  # later requests wait too
            self.waiting.popleft()
            seq.pages = self.pool.allocate(n)
            seq.slot = self.pool.allocate_slot()
            self.prefilling.append(seq)

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def batches(self, mixed: bool) -> Iterator[Batch]:
        """This step's passes. Each is computed after the previous one has run and been
        `advance`d (a sequence whose prompt a pass finished decodes in the next one)."""
        if mixed:
            batch = self._mixed_batch()
            if batch:
                yield batch
            return
        if self.prefilling:
            seq = self.prefilling[0]
            yield Batch([Chunk([seq], [seq.prompt[seq.pos:seq.pos + self.config.prefill_chunk]], True)])
        decode = self._decode_rows()
        if decode:
            yield Batch([Chunk(decode, [[s.out[-1]] for s in decode], False)])

    def _decode_rows(self) -> list[Sequence]:
        return [s for s in self.decoding if s.out and s.pos < s.next_due]

    def _mixed_batch(self) -> Batch | None:
        decode = self._decode_rows()
        chunks = [Chunk(decode, [[s.out[-1]] for s in decode], False)] if decode else []
        by_len: dict[int, tuple[list[Sequence], list[list[int]]]] = {}
        budget = self.config.prefill_chunk
        for seq in self.prefilling:
            if budget <= 0:
                break
            tokens = seq.prompt[seq.pos:seq.pos + budget]
            seqs, rows = by_len.setdefault(len(tokens), ([], []))
            seqs.append(seq)
            rows.append(tokens)
            budget -= len(tokens)
        chunks += [Chunk(seqs, rows, True) for seqs, rows in by_len.values()]
        return Batch(chunks) if chunks else None

    def advance(self, batch: Batch) -> int:
        """After a pass: its tokens are in the pool. Returns the prompt tokens it took."""
        prompt_tokens = 0
        for chunk in batch.chunks:
            for seq in chunk.seqs:
                seq.pos += chunk.q
            if chunk.prefill:
                prompt_tokens += chunk.q * len(chunk.seqs)
        for seq in batch.sampled:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
                self.decoding.append(seq)
        return prompt_tokens

    def release(self, seq: Sequence) -> None:
        """Take a finished sequence out of every queue and free its pages and slot."""
        for queue in (self.prefilling, self.decoding):
            if seq in queue:
                queue.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.pages)
        self.pool.release_slot(seq.slot)
        seq.pages, seq.slot = [], -1

    def load(self) -> dict:
        """Queue depth, running sequences and pool use (for /metrics)."""
        used = self.pool.num_pages - 1 - len(self.pool.free)
        return {"waiting": self.waiting_count(), "running": self.running,
                "kv_pages_used": used, "kv_pages_total": self.pool.num_pages - 1}
