"""The serving engine: continuous batching over a paged KV pool.

Each step reads as schedule -> execute -> update:
1. the scheduler (serve/scheduler.py) takes in new requests and cancellations (from any
   thread), and admits waiting sequences while fewer than `max_num_seqs` run and the pool
   has the pages for prompt + max_tokens;
2. it hands out the step's passes: with the lean forward (Llama-family models) ONE pass holds
   every decoding sequence's next token plus the next prompt chunks of the prefilling
   sequences, oldest first, up to `prefill_chunk` prompt tokens in all; with the model's
   own forward, one prefill chunk of the oldest prefilling sequence, then one decode pass;
3. the runner (serve/runner.py) runs each pass and returns the logits of the rows whose
   next token is due; sampling (serve/sampling.py) picks the tokens;
4. the detokenizer (serve/detokenize.py) turns each token into the text it settles and
   says when a sequence is done; the engine emits the events and frees finished sequences.
So requests join and leave the running batch at every step, and a long prompt is
prefilled in pieces between decode steps instead of stalling them. A failure while
sampling or detokenizing one sequence ends only that sequence.
Greedy decoding takes the argmax of fp32 logits, like `model.generate`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from llmzip import kv_schemes

from .detokenize import Detokenizer
from .kv_pool import KVPool
from .runner import make_runner
from .sampling import SamplingParams, sample_each
from .scheduler import Batch, EngineFull, PromptTooLong, Scheduler, SchedulerConfig, Sequence

__all__ = ["Engine", "EngineConfig", "EngineFull", "Event", "PromptTooLong", "Sequence"]

log = logging.getLogger("llmzip.serve")


@dataclass
class Event:
    """What one step produced for one sequence (delivered through its `emit`)."""

    text: str  # new text (held back while it could still turn into a stop string)
    tokens: list[int]
    logprobs: list  # per new token: (logprob, [(token, logprob), ...]) when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineConfig:
    max_num_seqs: int = 8
    max_model_len: int = 2048
    kv_cache_tokens: int | None = None  # pool capacity; None: max_num_seqs * max_model_len
    kv_dtype: str = "auto"  # a scheme of llmzip.kv_schemes
    page: int | None = None  # tokens per KV page; None: the scheme's (KIVI: its key group, 32; else 16)
    prefill_chunk: int = 512
    max_queue: int = 256
    attention: str = "auto"  # decode steps on an int8 pool: "kernel" (Triton, reads the pool), "gather", "auto"
    forward: str = "auto"  # "lean" (serve/lean.py, Llama-family), "model" (the model's own forward), "auto"
    prepack: bool = True  # lean forward on CPU: dense bf16 Linears on prepared copies (see LeanModel)
    graphs: str = "auto"  # decode passes at static shapes, CUDA graphs on CUDA: "on", "off", "auto" (on CUDA)


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
        self.device = next(model.parameters()).device
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        page = config.page or kv_schemes.get(config.kv_dtype).page
        self.pool = KVPool(mc.num_hidden_layers, -(-tokens // page) + 1, kv_heads, head_dim, self.dtype,
                           self.device, page, config.kv_dtype, kv_scales, slots=config.max_num_seqs)
        self.runner = make_runner(model, self.pool, self.device, self.dtype, config.forward, config.attention,
                                  config.prepack, config.graphs, config.max_model_len, config.max_num_seqs)
        self.scheduler = Scheduler(self.pool, SchedulerConfig(config.max_num_seqs, config.max_model_len,
                                                              config.prefill_chunk, config.max_queue))
        self.detokenizer = Detokenizer(tokenizer, _eos_ids(model, tokenizer), config.max_model_len)
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

    @property
    def paged(self) -> bool:
        """Whether decode passes read an int8 pool with the paged attention kernel."""
        return self.runner.paged

    @property
    def lean(self):
        """The lean forward (serve/lean.py) this engine runs, or None (the model's own)."""
        return getattr(getattr(self.runner, "prefill", self.runner), "lean", None)

    # -- any thread --------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> int:
        """Queue a request; `emit` is called from the engine thread with each Event."""
        return self.scheduler.submit(prompt, params, emit).id

    def abort(self, seq_id: int) -> None:
        self.scheduler.abort(seq_id)

    def abort_all(self) -> None:
        """Cancel every queued and running request (each gets a final "abort" event)."""
        self.scheduler.abort_all()

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
        with self.scheduler.lock:
            self._stop = True
            self.scheduler.lock.notify()
        if self._thread:
            self._thread.join()

    def load(self) -> dict:
        """Queue depth, running sequences and pool use (for /metrics)."""
        return self.scheduler.load()

    # -- engine thread -----------------------------------------------------------
    def _loop(self, poll: float | None = None) -> None:
        lock = self.scheduler.lock
        while True:
            with lock:
                while not self._stop and self.scheduler.idle():
                    lock.wait(poll)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # a failed step must not hang its clients
                log.exception("engine step failed; failing the running requests")
                for seq in self.scheduler.prefilling + self.scheduler.decoding:
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
        sched = self.scheduler
        for seq in sched.intake():
            self._finish(seq, "abort")
        sched.admit()
        if not sched.running:
            return False
        for batch in sched.batches(self.runner.mixed):
            self._run(batch)
        self.stats["steps"] += 1
        return True

    def run_until_done(self) -> None:
        """Step in the calling thread until every submitted request has finished."""
        while self.step() or self.scheduler.waiting_count():
            pass

    def _run(self, batch: Batch) -> None:
        logits = self.runner.execute(batch)
        self.stats["prompt_tokens"] += self.scheduler.advance(batch)
        if logits is not None:
            self._sampled(logits, batch.sampled)

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
                text, finish = self.detokenizer.advance(seq, tok)
            except Exception:  # e.g. detokenizing its text: only this sequence ends
                log.exception("sequence %d failed; ending it", seq.id)
                self._finish(seq, "error")
                continue
            if finish:
                self._finish(seq, finish, text)
            else:
                self._emit(seq, text)  # one event per token, text or not, so token counts and logprobs stream

    def _emit(self, seq: Sequence, text: str, finish: str | None = None) -> None:
        lps, seq.pending_lp = seq.pending_lp, []
        new = [seq.out[-1]] if seq.out and finish not in ("abort", "error") else []
        ev = Event(text, new, lps, finish, len(seq.prompt), len(seq.out))
        if self.deliver is None:
            seq.emit(ev)
        else:
            self._events.append((seq.emit, ev))

    def _finish(self, seq: Sequence, reason: str, text: str = "") -> None:
        """reason: stop | length (done; `text` is the rest of its text), abort (cancelled by
        the client), error (the step failed)."""
        if seq.finished:
            return
        seq.finished = True
        self.scheduler.release(seq)
        self.stats[{"abort": "aborted", "error": "failed"}.get(reason, "finished")] += 1
        self._emit(seq, text, reason)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is not None:
            ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids
