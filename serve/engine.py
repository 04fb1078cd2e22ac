"""The serving engine: continuous batching over a paged KV pool.

Every step of the loop:
1. takes in new requests and cancellations (from any thread);
2. admits waiting sequences while fewer than `max_num_seqs` run and the pool has the
   pages for prompt + max_tokens (reserved up front, so a running sequence never waits
   for memory and nothing is ever preempted);
3. with the lean forward (serve/lean.py, Llama-family models): runs ONE forward pass for
   every decoding sequence's next token plus the next prompt chunks of the prefilling
   sequences, oldest first, up to `prefill_chunk` prompt tokens in all; so eight requests
   that arrive together are prefilled in one pass, beside the running decodes. With the
   model's own forward (other architectures, or the paged int8 attention kernel): one
   prefill chunk of the oldest prefilling sequence, then one decode pass.
So requests join and leave the running batch at every step, and a long prompt is
prefilled in pieces between decode steps instead of stalling them.

Each forward pass is the model's own (`model(input_ids, position_ids, attention_mask,
cache)`), or for Llama-family models the same function with fewer operations
(serve/lean.py), with a 4-D mask that lets each row see exactly its own positions, and a
`StepCache` that writes new K/V into the pool and reads the rows' pages back. The
quantized Linears inside run whatever kernel `llmzip.checkpoint.load` chose.
Greedy decoding takes the argmax of fp32 logits, like `model.generate`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmzip.kv_cache import cache_kwarg

from .detokenize import incremental_text
from .kv_pool import KIVI, KVPool, RowSpans, StepCache, paged_step, register_paged_attention
from .lean import Group, lean_model
from .sampling import SamplingParams, sample_each

log = logging.getLogger("llmzip.serve")


class EngineFull(RuntimeError):
    """The waiting queue is full: the caller should answer 503 and the client retry."""


class PromptTooLong(ValueError):
    pass


@dataclass
class Event:
    """What one step produced for one sequence (delivered through its `emit`)."""

    text: str  # new text (held back while it could still turn into a stop string)
    tokens: list[int]
    logprobs: list  # per new token: (logprob, [(token, logprob), ...]) when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)  # one request: compared (in, remove) by identity
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
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


@dataclass
class EngineConfig:
    max_num_seqs: int = 8
    max_model_len: int = 2048
    kv_cache_tokens: int | None = None  # pool capacity; None: max_num_seqs * max_model_len
    kv_dtype: str = "auto"
    page: int | None = None  # tokens per KV page; None: 32 for int4/int2 (their key group), else 16
    prefill_chunk: int = 512
    max_queue: int = 256
    attention: str = "auto"  # decode steps on an int8 pool: "kernel" (Triton, reads the pool), "gather", "auto"
    forward: str = "auto"  # "lean" (serve/lean.py, Llama-family), "model" (the model's own forward), "auto"
    prepack: bool = True  # lean forward on CPU: dense bf16 Linears on prepared copies (see LeanModel)


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), kv_scales: list | None = None):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limit = getattr(mc, "max_position_embeddings", None)
        if limit and config.max_model_len > limit:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's {limit} positions")
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        tokens = config.kv_cache_tokens or config.max_num_seqs * config.max_model_len
        param = next(model.parameters())
        self.device = param.device
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.dtype = dtype
        page = config.page or (32 if config.kv_dtype in KIVI else 16)
        self.pool = KVPool(mc.num_hidden_layers, -(-tokens // page) + 1, kv_heads, head_dim, dtype,
                           self.device, page, config.kv_dtype, kv_scales, slots=config.max_num_seqs)
        self.eos = _eos_ids(model, tokenizer)
        self.paged = self._use_paged_kernel(config)
        if self.paged:
            register_paged_attention()
        self._cache_kw = cache_kwarg(model)
        if config.forward not in ("auto", "lean", "model"):
            raise ValueError(f"forward {config.forward!r}: choose auto, lean or model")
        self.lean = lean_model(model, config.prepack) if config.forward != "model" else None
        if config.forward == "lean" and self.lean is None:
            raise ValueError(f"the lean forward pass does not cover model type {model.config.model_type!r}")
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._aborts: set[int] = set()
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "aborted": 0, "failed": 0,
                      "steps": 0, "step_seconds": 0.0}
        self.ttft: deque[float] = deque(maxlen=4096)  # seconds to first token; the server drains it
        self._thread: threading.Thread | None = None
        self._stop = False
        # deliver(batch): when set, a step's events are handed over at its end in one call,
        # as [(emit, Event), ...], instead of one emit call each (the server wakes its event
        # loop once per step instead of once per sequence and token).
        self.deliver: Callable[[list[tuple[Callable[[Event], None], Event]]], None] | None = None
        self._events: list[tuple[Callable[[Event], None], Event]] = []
        # Set before the app starts when the caller will drive the loop with run_loop();
        # start() then spawns no thread.
        self.external_loop = False

    def _use_paged_kernel(self, config: EngineConfig) -> bool:
        if config.attention not in ("auto", "kernel", "gather"):
            raise ValueError(f"attention {config.attention!r}: choose auto, kernel or gather")
        if config.attention == "kernel" and config.kv_dtype != "int8":
            raise ValueError(f"the paged attention kernel reads an int8 pool, not {config.kv_dtype!r}: use "
                             "attention='gather' or 'auto'")
        if config.attention == "gather" or config.kv_dtype != "int8":
            return False
        from llmzip.kernels import triton_kv_attention as tk

        if config.attention == "kernel":
            if tk.triton is None:
                raise ImportError("the paged attention kernel needs triton: pip install 'llmzip[kernels]'")
            return True
        return tk.triton is not None and self.device.type == "cuda"

    # -- any thread --------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> int:
        """Queue a request; `emit` is called from the engine thread with each Event."""
        if not prompt:
            raise PromptTooLong("the prompt is empty")
        need = len(prompt) + params.max_tokens
        if len(prompt) >= self.config.max_model_len:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens; this server's context is "
                                f"{self.config.max_model_len} tokens (--max-model-len)")
        if min(need, self.config.max_model_len) > self.pool.capacity_tokens:
            raise PromptTooLong(f"prompt + max_tokens need {need} tokens of KV cache; the pool holds "
                                f"{self.pool.capacity_tokens}")
        seq = Sequence(next(self._ids), list(prompt), params, emit)
        seq.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                      else int(torch.randint(2**62, (1,)).item()))
        with self._lock:
            if len(self._incoming) + len(self.waiting) >= self.config.max_queue:
                raise EngineFull(f"{self.config.max_queue} requests are already waiting")
            self._incoming.append(seq)
            self._lock.notify()
        return seq.id

    def abort(self, seq_id: int) -> None:
        with self._lock:
            self._aborts.add(seq_id)
            self._lock.notify()

    def abort_all(self) -> None:
        """Cancel every queued and running request (each gets a final "abort" event)."""
        with self._lock:
            seqs = itertools.chain(self._incoming, self.waiting, self.prefilling, self.decoding)
            self._aborts.update(s.id for s in seqs)
            self._lock.notify()

    def start(self) -> None:
        """Run the loop in a new thread, unless `run_loop` runs it in the caller's thread."""
        self._stop = False
        if self.external_loop:
            return
        self._thread = threading.Thread(target=self._loop, name="llmzip-engine", daemon=True)
        self._thread.start()

    def run_loop(self, poll: float = 0.2) -> None:
        """Run the loop in this thread until `shutdown` (for `llmzip serve`: the thread that
        loaded the model, with `external_loop` set before start()). On CPU, torch's OpenMP ops
        issued from a second thread, after the main thread has used OpenMP, ran ~1.5x slower
        here (SmolLM2 W4, 8 streams, the engine without HTTP: 128 vs 192 tok/s).

        While idle it wakes every `poll` seconds: the kernel may deliver a process's SIGINT to
        any of its threads, and a Python signal handler runs only when the main thread next
        runs bytecode, so an untimed wait there could sleep through Ctrl-C."""
        if not self.external_loop or self._thread is not None:
            raise RuntimeError("set engine.external_loop = True before start() to drive the loop with run_loop()")
        self._loop(poll)

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread:
            self._thread.join()

    def load(self) -> dict:
        """Queue depth, running sequences and pool use (for /metrics)."""
        with self._lock:
            waiting = len(self._incoming) + len(self.waiting)
        used = self.pool.num_pages - 1 - len(self.pool.free)
        return {"waiting": waiting, "running": len(self.prefilling) + len(self.decoding),
                "kv_pages_used": used, "kv_pages_total": self.pool.num_pages - 1}

    # -- engine thread -----------------------------------------------------------
    def _loop(self, poll: float | None = None) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._incoming or self._aborts or self.waiting
                                              or self.prefilling or self.decoding):
                    self._lock.wait(poll)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # a failed step must not hang its clients
                log.exception("engine step failed; failing the running requests")
                for seq in list(self.prefilling) + list(self.decoding):
                    self._finish(seq, "error")
            finally:
                self._flush()

    def _flush(self) -> None:
        if self._events:
            batch, self._events = self._events, []
            try:
                self.deliver(batch)
            except Exception:  # a receiver's failure must not stop the engine
                log.exception("delivering a step's events failed")

    def step(self) -> bool:
        """One iteration (see the module docstring); returns whether any work was done."""
        t0 = time.perf_counter()
        try:
            worked = self._step()
        finally:
            self._flush()
        if worked:
            self.stats["step_seconds"] += time.perf_counter() - t0
        return worked

    @torch.inference_mode()
    def _step(self) -> bool:
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        for seq in [s for s in itertools.chain(self.waiting, self.prefilling, self.decoding) if s.id in aborts]:
            self._finish(seq, "abort")
        self._admit()
        worked = bool(self.prefilling or self.decoding)
        if worked and self.lean is not None and not self.paged:
            self._mixed_step()
            self.stats["steps"] += 1
            return True
        if self.prefilling:
            self._prefill(self.prefilling[0])
        if self.decoding:
            self._decode()
        self.stats["steps"] += worked
        return worked

    def run_until_done(self) -> None:
        """Step in the calling thread until every submitted request has finished."""
        while self.step() or self._incoming or self.waiting:
            pass

    def _admit(self) -> None:
        while self.waiting and len(self.prefilling) + len(self.decoding) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self.pool.pages_for(min(len(seq.prompt) + seq.params.max_tokens, self.config.max_model_len))
            if n > len(self.pool.free):
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            seq.pages = self.pool.allocate(n)
            seq.slot = self.pool.allocate_slot()
            self.prefilling.append(seq)

    def _group_inputs(self, positions: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, StepCache]:
        """For rows `seqs` taking new tokens at `positions` [rows, q]: the 4-D attention mask
        (each row sees exactly its own positions so far) and the StepCache, on the device."""
        page, dev = self.pool.page, self.device
        n = max(self.pool.pages_for(int(p[-1]) + 1) for p in positions)
        table = torch.tensor([s.pages[:n] + [0] * (n - len(s.pages[:n])) for s in seqs], dtype=torch.long)
        pages = table.gather(1, positions // page)
        keys = torch.arange(n * page)
        mask = torch.zeros(positions.shape[0], 1, positions.shape[1], n * page, dtype=self.dtype)
        mask.masked_fill_(keys[None, None, None, :] > positions[:, None, :, None], torch.finfo(self.dtype).min)
        paged = self.paged and positions.shape[1] == 1
        lengths = (positions[:, 0] + 1).to(dev) if paged else None
        table_dev = table.to(dev)
        rows = RowSpans(table, table_dev, [s.slot for s in seqs], positions[:, 0], positions.shape[1], page, dev) \
            if self.pool.kivi else None
        cache = StepCache(self.pool, table_dev, pages.to(dev), (positions % page).to(dev), lengths, rows)
        return mask.to(dev), cache

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [rows, vocab] at the last position of each row. ids, positions: [rows, q].
        Decode steps (q = 1) over an int8 pool use the paged attention kernel when enabled."""
        dev = self.device
        mask, cache = self._group_inputs(positions, seqs)
        paged = self.paged and positions.shape[1] == 1
        if self.lean is not None and not paged:
            rows, q = ids.shape
            last = torch.arange(q - 1, rows * q, q, device=dev)
            return self.lean(ids.reshape(-1).to(dev), positions.reshape(-1).to(dev),
                             [Group(0, rows, q, mask, cache)], last)
        with paged_step(self.model, cache) if paged else contextlib.nullcontext():
            out = self.model(input_ids=ids.to(dev), position_ids=positions.to(dev), attention_mask=mask,
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :]

    def _mixed_step(self) -> None:
        """One forward pass for the whole step (lean forward): every decoding row's next token
        and the next prompt chunks of the prefilling sequences, oldest first, up to
        `prefill_chunk` prompt tokens in all. Rows are grouped by their number of new tokens."""
        decode = [s for s in self.decoding if s.out and s.pos < len(s.prompt) + len(s.out)]
        by_len: dict[int, list[tuple[Sequence, list[int]]]] = {}
        budget = self.config.prefill_chunk
        for seq in self.prefilling:
            if budget <= 0:
                break
            chunk = seq.prompt[seq.pos:seq.pos + budget]
            by_len.setdefault(len(chunk), []).append((seq, chunk))
            budget -= len(chunk)
        specs = ([(decode, [[s.out[-1]] for s in decode])] if decode else []) + \
            [([s for s, _ in items], [c for _, c in items]) for items in by_len.values()]
        groups, ids, positions, last, sampled = [], [], [], [], []
        start = 0
        for seqs, rows in specs:
            q = len(rows[0])
            pos = torch.tensor([s.pos for s in seqs])[:, None] + torch.arange(q)
            mask, cache = self._group_inputs(pos, seqs)
            groups.append(Group(start, len(seqs), q, mask, cache))
            ids.append(torch.tensor(rows).reshape(-1))
            positions.append(pos.reshape(-1))
            for r, seq in enumerate(seqs):
                if seq.pos + q == len(seq.prompt) + len(seq.out):  # its next token is due
                    last.append(start + r * q + q - 1)
                    sampled.append(seq)
            start += len(seqs) * q
        dev = self.device
        logits = self.lean(torch.cat(ids).to(dev), torch.cat(positions).to(dev), groups,
                           torch.tensor(last, dtype=torch.long, device=dev))  # empty: a partial prompt chunk only
        for g, (seqs, _) in zip(groups, specs):
            for seq in seqs:
                seq.pos += g.q
                if g.q > 1 or not seq.out:
                    self.stats["prompt_tokens"] += g.q
        for seq in sampled:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
                self.decoding.append(seq)
        if sampled:
            self._sampled(logits, sampled)

    def _prefill(self, seq: Sequence) -> None:
        chunk = seq.prompt[seq.pos:seq.pos + self.config.prefill_chunk]
        positions = torch.arange(seq.pos, seq.pos + len(chunk))[None]
        logits = self._forward(torch.tensor([chunk]), positions, [seq])
        seq.pos += len(chunk)
        self.stats["prompt_tokens"] += len(chunk)
        if seq.pos == len(seq.prompt):
            self.prefilling.remove(seq)
            self.decoding.append(seq)
            self._sampled(logits, [seq])

    def _decode(self) -> None:
        seqs = [s for s in self.decoding if s.out and s.pos < len(s.prompt) + len(s.out)]
        if not seqs:
            return
        ids = torch.tensor([[s.out[-1]] for s in seqs])
        positions = torch.tensor([[s.pos] for s in seqs])
        logits = self._forward(ids, positions, seqs)
        for s in seqs:
            s.pos += 1
        self._sampled(logits, seqs)

    def _sampled(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        res = sample_each(logits, [s.params for s in seqs], [s.out for s in seqs], [s.generator for s in seqs])
        now = time.perf_counter()
        for seq, tok, lp in zip(seqs, res.tokens, res.logprobs):
            if tok is None:  # sampling this row failed (logged): only its sequence ends
                self._finish(seq, "error")
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.ttft.append(now - seq.arrived)
            seq.out.append(tok)
            self.stats["generation_tokens"] += 1
            if lp is not None:
                seq.pending_lp.append(lp)
            try:
                self._advance(seq, tok)
            except Exception:  # e.g. detokenizing its text: only this sequence ends
                log.exception("sequence %d failed; ending it", seq.id)
                self._finish(seq, "error")

    def _advance(self, seq: Sequence, tok: int) -> None:
        """Emit the text the new token settles, and finish the sequence when it is done."""
        p = seq.params
        if tok in self.eos and not p.ignore_eos:
            return self._finish(seq, "stop", text_ids=seq.out[:-1])
        text = self._text(seq)
        hits = [i for i in (text.find(s, max(0, seq.sent - len(s))) for s in p.stop) if i >= 0]
        if hits:
            return self._finish(seq, "stop", text=text[:min(hits)])
        if len(seq.out) >= p.max_tokens or seq.pos + 1 >= self.config.max_model_len:
            return self._finish(seq, "length", text=text)
        hold = max((len(s) for s in p.stop), default=1) - 1
        safe = len(text.rstrip("\ufffd")) - hold  # an incomplete character, or a stop string's start
        delta = text[seq.sent:safe] if safe > seq.sent else ""
        seq.sent += len(delta)
        self._emit(seq, delta)  # one event per token, text or not, so token counts and logprobs stream

    def _text(self, seq: Sequence, ids: list[int] | None = None) -> str:
        return incremental_text(self.tokenizer, seq, ids)  # serve/detokenize.py

    def _emit(self, seq: Sequence, text: str, finish: str | None = None) -> None:
        lps, seq.pending_lp = seq.pending_lp, []
        new = [seq.out[-1]] if seq.out and finish not in ("abort", "error") else []
        ev = Event(text, new, lps, finish, len(seq.prompt), len(seq.out))
        if self.deliver is None:
            seq.emit(ev)
        else:
            self._events.append((seq.emit, ev))

    def _finish(self, seq: Sequence, reason: str, text: str | None = None, text_ids=None) -> None:
        """reason: stop | length (done), abort (cancelled by the client), error (the step failed)."""
        if seq.finished:
            return
        if text is None:  # before `finished`: when decoding fails, the caller ends it with "error"
            text = self._text(seq, text_ids) if reason in ("stop", "length") else ""
        seq.finished = True
        for group in (self.prefilling, self.decoding):
            if seq in group:
                group.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.pages)
        self.pool.release_slot(seq.slot)
        seq.pages, seq.slot = [], -1
        self.stats[{"abort": "aborted", "error": "failed"}.get(reason, "finished")] += 1
        self._emit(seq, text[seq.sent:] if reason in ("stop", "length") else "", reason)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is not None:
            ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids
