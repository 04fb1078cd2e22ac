"""How the engine runs a scheduled pass: inputs, masks and block tables, and the forward paths.

Every runner answers `execute(batch) -> logits`, the fp32-castable logits [len(batch.sampled),
vocab] of the rows whose next token is due (serve/scheduler.py), after writing every new
token's K/V into the pool. `mixed` says whether one pass may hold decode rows and prompt
chunks of several lengths together. The paths:
- `LeanRunner`: serve/lean.py's forward for Llama-family models, one pass for a whole step;
- `ModelRunner`: the model's own forward (`model(input_ids, position_ids, attention_mask,
  cache)`), one chunk per pass; attention reads K/V gathered (and dequantized) from the pool;
- `PagedKernelRunner`: decode passes over an int8 pool through the model's forward with the
  paged attention kernel (kernels/triton_kv_attention.py), which reads the pool itself;
  prompt chunks through the lean or the model forward.
Each pass sees a 4-D mask that lets each row attend exactly its own positions so far, and a
`StepCache` (serve/kv_pool.py) that writes the new K/V and reads the rows' pages back.
"""

from __future__ import annotations

import torch

from llmzip.kv_cache import cache_kwarg
from llmzip.kv_schemes import KVScheme

from .kv_pool import KVPool, RowSpans, StepCache, paged_attention_on, register_paged_attention
from .lean import Group, lean_model
from .scheduler import Batch, Chunk, Sequence

FORWARDS = ("auto", "lean", "model")
ATTENTIONS = ("auto", "kernel", "gather")
PAGED_KERNEL_LAYOUT = "int8-token"  # the pool layout kernels/triton_kv_attention.py reads


def block_table(seqs: list[Sequence], n: int, rows: int | None = None) -> torch.Tensor:
    """[rows, n] long: each sequence's first n pages, padded with page 0 (and padding rows of
    page 0 up to `rows`)."""
    table = torch.zeros(rows or len(seqs), n, dtype=torch.long)
    for r, s in enumerate(seqs):
        table[r, :min(n, len(s.pages))] = torch.tensor(s.pages[:n], dtype=torch.long)
    return table


def causal_mask(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, q, kv_len]: 0 where a new token at `positions` [rows, q] may attend key
    position k (k <= its position), the dtype's minimum elsewhere."""
    keys = torch.arange(kv_len)
    mask = torch.zeros(positions.shape[0], 1, positions.shape[1], kv_len, dtype=dtype)
    return mask.masked_fill_(keys[None, None, None, :] > positions[:, None, :, None], torch.finfo(dtype).min)


class StepInputs:
    """Builds a chunk's attention mask and StepCache from its rows' block tables."""

    def __init__(self, pool: KVPool, dtype: torch.dtype, device: torch.device):
        self.pool, self.dtype, self.device = pool, dtype, device

    def __call__(self, positions: torch.Tensor, seqs: list[Sequence], paged: bool = False):
        """For rows `seqs` taking new tokens at `positions` [rows, q]: the mask [rows, 1, q,
        kv_len] and the StepCache, on the device. paged: attention reads the pool itself
        (the cache then carries each row's length)."""
        pool, dev = self.pool, self.device
        page = pool.page
        n = max(pool.pages_for(int(p[-1]) + 1) for p in positions)
        table = block_table(seqs, n)
        pages = table.gather(1, positions // page)
        mask = causal_mask(positions, n * page, self.dtype)
        lengths = (positions[:, 0] + 1).to(dev) if paged else None
        table_dev = table.to(dev)
        rows = RowSpans(table, table_dev, [s.slot for s in seqs], positions[:, 0], positions.shape[1], page, dev) \
            if pool.kivi else None
        cache = StepCache(pool, table_dev, pages.to(dev), (positions % page).to(dev), lengths, rows)
        return mask.to(dev), cache


class LeanRunner:
    """serve/lean.py's forward: every chunk of a batch in one pass."""

    mixed = True
    paged = False

    def __init__(self, lean, inputs: StepInputs):
        self.lean, self.inputs = lean, inputs

    def execute(self, batch: Batch) -> torch.Tensor:
        groups, ids, positions, last = [], [], [], []
        start = 0
        for chunk in batch.chunks:
            pos = chunk.positions()
            mask, cache = self.inputs(pos, chunk.seqs)
            rows, q = len(chunk.seqs), chunk.q
            groups.append(Group(start, rows, q, mask, cache))
            ids.append(torch.tensor(chunk.tokens).reshape(-1))
            positions.append(pos.reshape(-1))
            last += [start + r * q + q - 1 for r, due in enumerate(chunk.due) if due]
            start += rows * q
        dev = self.inputs.device
        return self.lean(torch.cat(ids).to(dev), torch.cat(positions).to(dev), groups,
                         torch.tensor(last, dtype=torch.long, device=dev))  # empty: a partial prompt chunk only

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [rows, vocab] at the last position of each row; ids, positions: [rows, q]."""
        dev = self.inputs.device
        mask, cache = self.inputs(positions, seqs)
        rows, q = ids.shape
        last = torch.arange(q - 1, rows * q, q, device=dev)
        return self.lean(ids.reshape(-1).to(dev), positions.reshape(-1).to(dev), [Group(0, rows, q, mask, cache)],
                         last)


class ModelRunner:
    """The model's own forward, one chunk per pass, K/V gathered from the pool."""

    mixed = False
    paged = False

    def __init__(self, model, inputs: StepInputs):
        self.model, self.inputs = model, inputs
        self._cache_kw = cache_kwarg(model)

    def execute(self, batch: Batch) -> torch.Tensor | None:
        """One model call per chunk; None when no row is due (a partial prompt chunk only)."""
        logits = [x for x in map(self._chunk, batch.chunks) if x is not None]
        return None if not logits else logits[0] if len(logits) == 1 else torch.cat(logits)

    def _chunk(self, chunk: Chunk) -> torch.Tensor | None:
        logits = self.forward(torch.tensor(chunk.tokens), chunk.positions(), chunk.seqs)
        due = [r for r, d in enumerate(chunk.due) if d]
        return None if not due else logits if len(due) == len(chunk.seqs) else logits[due]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        mask, cache = self.inputs(positions, seqs)
        return self._logits(ids, positions, mask, cache)

    def _logits(self, ids, positions, mask, cache, **extra) -> torch.Tensor:
        dev = self.inputs.device
        out = self.model(input_ids=ids.to(dev), position_ids=positions.to(dev), attention_mask=mask,
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}, **extra)
        return out.logits[:, -1, :]


class PagedKernelRunner(ModelRunner):
    """Single-token passes over an int8 pool: the model's forward with the paged attention
    kernel, which reads K/V from the pool; longer chunks go to `prefill` (lean or model)."""

    paged = True

    def __init__(self, model, inputs: StepInputs, prefill: LeanRunner | ModelRunner):
        super().__init__(model, inputs)
        self.prefill = prefill
        register_paged_attention()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if positions.shape[1] != 1:
            return self.prefill.forward(ids, positions, seqs)
        mask, cache = self.inputs(positions, seqs, paged=True)
        with paged_attention_on(self.model) as kwargs:
            return self._logits(ids, positions, mask, cache, **kwargs(cache))


def make_runner(model, pool: KVPool, device: torch.device, dtype: torch.dtype, forward: str = "auto",
                attention: str = "auto", prepack: bool = True, graphs: str = "auto", max_model_len: int = 2048,
                max_rows: int = 8):
    """The runner for `forward` ("lean", "model", "auto": lean where the architecture has
    it), `attention` on an int8 pool ("kernel", "gather", "auto": the kernel on CUDA when
    triton is installed) and `graphs` (decode passes at static shapes: "on", "off", "auto":
    on CUDA with the lean forward, captured as CUDA graphs there)."""
    if forward not in FORWARDS:
        raise ValueError(f"forward {forward!r}: choose {', '.join(FORWARDS)}")
    if graphs not in GRAPH_MODES:
        raise ValueError(f"graphs {graphs!r}: choose {', '.join(GRAPH_MODES)}")
    inputs = StepInputs(pool, dtype, device)
    lean = lean_model(model, prepack) if forward != "model" else None
    if forward == "lean" and lean is None:
        raise ValueError(f"the lean forward pass does not cover model type {model.config.model_type!r}")
    base = LeanRunner(lean, inputs) if lean is not None else ModelRunner(model, inputs)
    if _use_paged_kernel(attention, pool.scheme, device):
        if graphs == "on":
            raise ValueError("static decode passes (graphs='on') run the lean forward, not the paged attention kernel")
        return PagedKernelRunner(model, inputs, base)
    static_ok = lean is not None and not pool.kivi
    if graphs == "on" and not static_ok:
        raise ValueError("static decode passes (graphs='on') need the lean forward (Llama-family models) and a "
                         f"non-KIVI KV pool, not {model.config.model_type!r} with {pool.scheme.name!r}")
    if graphs == "on" or (graphs == "auto" and static_ok and device.type == "cuda"):
        return GraphRunner(base, max_model_len, max_rows, capture=device.type == "cuda")
    return base


def _use_paged_kernel(attention: str, scheme: KVScheme, device: torch.device) -> bool:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r}: choose {', '.join(ATTENTIONS)}")
    readable = scheme.layout == PAGED_KERNEL_LAYOUT
    if attention == "kernel" and not readable:
        raise ValueError(f"the paged attention kernel reads an int8 pool, not {scheme.name!r}: use "
                         "attention='gather' or 'auto'")
    if attention == "gather" or not readable:
        return False
    from llmzip.kernels import triton_kv_attention as tk

    if attention == "kernel":
        if tk.triton is None:
            raise ImportError("the paged attention kernel needs triton: pip install 'llmzip[kernels]'")
        return True
    return tk.triton is not None and device.type == "cuda"


# ---------- decode passes at static shapes (CUDA graphs) ----------

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)  # rows a decode pass is padded to
GRAPH_MODES = ("auto", "on", "off")


class _StaticDecode:
    """One bucket's decode pass over fixed buffers: `rows` rows (the real ones first, the rest
    padding), block tables of `pages` pages each (padded with page 0), a mask over all of
    their positions. Padding rows take token 0 at position 0 and write it to page 0, which is
    never handed out; every row reads page 0 only where its mask hides it."""

    def __init__(self, lean, pool: KVPool, rows: int, pages: int, dtype: torch.dtype, device: torch.device,
                 capture: bool):
        self.lean, self.pool, self.rows, self.pages, self.dtype = lean, pool, rows, pages, dtype
        long = dict(dtype=torch.long, device=device)
        self.ids, self.positions = torch.zeros(rows, **long), torch.zeros(rows, **long)
        self.table = torch.zeros(rows, pages, **long)
        self.where, self.offsets = torch.zeros(rows, 1, **long), torch.zeros(rows, 1, **long)
        self.mask = torch.zeros(rows, 1, 1, pages * pool.page, dtype=dtype, device=device)
        cache = StepCache(pool, self.table, self.where, self.offsets)
        self.groups = [Group(0, rows, 1, self.mask, cache)]
        self.last = torch.arange(rows, device=device)
        self.capture, self.graph, self.out = capture, None, None

    def fill(self, chunk: Chunk) -> None:
        """Copy this pass's inputs into the buffers (built on the host, one copy each)."""
        n, page = len(chunk.seqs), self.pool.page
        ids = torch.zeros(self.rows, dtype=torch.long)
        ids[:n] = torch.tensor([t[0] for t in chunk.tokens])
        pos = torch.zeros(self.rows, dtype=torch.long)
        pos[:n] = torch.tensor([s.pos for s in chunk.seqs])
        table = block_table(chunk.seqs, self.pages, self.rows)
        mask = causal_mask(pos[:, None], self.pages * page, self.dtype)
        for buf, host in ((self.ids, ids), (self.positions, pos), (self.table, table), (self.mask, mask),
                          (self.where, table.gather(1, (pos // page)[:, None])), (self.offsets, (pos % page)[:, None])):
            buf.copy_(host, non_blocking=True)

    def run(self) -> torch.Tensor:
        """Logits [rows, vocab] of the filled pass: replayed from its CUDA graph when captured."""
        if not self.capture:
            return self.lean(self.ids, self.positions, self.groups, self.last)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, autotuning)
            self.lean(self.ids, self.positions, self.groups, self.last)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.lean(self.ids, self.positions, self.groups, self.last)


class GraphRunner:
    """Decode-only passes (one new token per row, every row due, the usual state of a busy
    server) at static shapes: rows padded to the next of GRAPH_BUCKETS, block tables to the
    context's pages. On CUDA each bucket's pass is captured once as a CUDA graph and
    replayed, so a step costs one launch instead of hundreds; elsewhere the same static pass
    runs eagerly (tests/test_graph_runner.py: equal to the dynamic pass). Every other pass,
    prefill included, goes to `base` eagerly. KIVI pools decide per step on the host which
    pages fill, so they keep the dynamic pass."""

    mixed = True
    paged = False

    def __init__(self, base: LeanRunner, max_model_len: int, max_rows: int, capture: bool):
        self.base, self.lean = base, base.lean
        inputs = base.inputs
        self.pool, self.dtype, self.device = inputs.pool, inputs.dtype, inputs.device
        self.pages = self.pool.pages_for(max_model_len)
        self.buckets = sorted({b for b in GRAPH_BUCKETS if b < max_rows} | {max_rows})
        self.capture = capture
        self._passes: dict[int, _StaticDecode] = {}

    def execute(self, batch: Batch) -> torch.Tensor | None:
        chunk = batch.chunks[0]
        if len(batch.chunks) > 1 or chunk.prefill or chunk.q != 1 or not all(chunk.due) \
                or len(chunk.seqs) > self.buckets[-1]:
            return self.base.execute(batch)
        rows = next(b for b in self.buckets if b >= len(chunk.seqs))
        static = self._passes.get(rows)
        if static is None:
            static = self._passes[rows] = _StaticDecode(self.lean, self.pool, rows, self.pages, self.dtype,
                                                        self.device, self.capture)
        static.fill(chunk)
        return static.run()[:len(chunk.seqs)]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        return self.base.forward(ids, positions, seqs)
