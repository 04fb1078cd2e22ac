"""Paged K/V storage for the serving engine, and the transformers `Cache` that reads it.

The pool holds, per decoder layer, K and V in pages of `page` tokens:
`[num_pages, kv_heads, page, head_dim]`. Each running sequence owns a list of pages
(its block table); page 0 is never handed out and stays zero, so padding a batch's
block tables with it reads zeros, never stale values. Capacity is fixed at start-up.

`kv_dtype`, a scheme of llmzip.kv_schemes:
- "auto": the model dtype;
- "int8": one uint8 code per element with an fp16 scale and a uint8 zero point per token
  and head over head_dim (llmzip.kv_cache's INT8 scheme), dequantized when a step reads
  its pages (or, on CUDA, by the paged attention kernel);
- "fp8": float8 e4m3 with one scale per layer for K and one for V: the calibrated scales
  of the checkpoint (`llmzip quantize --kv-cache-dtype fp8`) when present, otherwise set from
  the first prompt's K/V of each layer;
- "int4", "int2": KIVI (llmzip.kv_cache's scheme with group = page): a full page stores
  its keys per channel over the page's tokens and its values per token over groups of
  `page` channels, codes packed LSB first into uint8 [pages, kv_heads, page, D*bits/8],
  fp16 scale and minimum. A sequence's open page (the one it is still writing) lives in
  full precision in a residual slot of its own ([slots, kv_heads, page, D] per layer,
  one slot per running sequence) and is quantized into its page the moment it fills.
  So the newest 0..page-1 tokens are read in full precision and every older token is read
  back quantized, as QuantizedKVCache does with a residual window of the open page.

One engine step calls the model once with a `StepCache` that knows, for each row of the
batch, its block table and the positions the new tokens take. Attention then sees, per
row, K/V of length `kv_len` (whole pages); positions a row has not written are masked.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache

from llmzip import kv_schemes
from llmzip.kv_cache import (FP8, PARAM_DTYPE, KVCacheConfig, dequantize_fp8, dequantize_int8, dequantize_keys,
                             dequantize_values, fp8_scale, quantize_fp8, quantize_int8, quantize_keys, quantize_values)

STORE_DTYPES = {"int8-token": torch.uint8, "fp8-tensor": FP8, "kivi": torch.uint8}  # by layout; "model": its dtype


class KVPool:
    def __init__(self, num_layers: int, num_pages: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device, page: int = 16, kv_dtype: str = "auto", scales: list | None = None, slots: int = 0):
        self.scheme = scheme = kv_schemes.get(kv_dtype)
        if num_pages < 2:
            raise ValueError("the KV pool needs at least 2 pages (page 0 is reserved)")
        self.num_layers, self.num_pages, self.page = num_layers, num_pages, page
        self.kv_heads, self.head_dim, self.dtype, self.kv_dtype = kv_heads, head_dim, dtype, kv_dtype
        self.bits = scheme.bits if scheme.kivi else None
        if self.bits and (head_dim * self.bits % 8 or head_dim % min(page, head_dim)):
            raise ValueError(f"--kv-cache-dtype {kv_dtype} needs head_dim ({head_dim}) to split into whole bytes and "
                             f"into groups of {page} channels")
        shape = (num_pages, kv_heads, page, head_dim * self.bits // 8 if self.bits else head_dim)
        store = STORE_DTYPES.get(scheme.layout, dtype)
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.kp = self.vp = None  # int8: (scale, zero) per token and head; KIVI: (scale, min); per layer
        if scheme.layout == "int8-token":
            pshape = (num_pages, kv_heads, page, 1)
            self.kp = [_params(pshape, device) for _ in range(num_layers)]
            self.vp = [_params(pshape, device) for _ in range(num_layers)]
        self.rk = self.rv = None  # KIVI: full-precision open page per slot, per layer
        self.free_slots: list[int] = []
        if self.bits:
            if slots < 1:
                raise ValueError(f"--kv-cache-dtype {kv_dtype} needs residual slots (one per running sequence)")
            # A page is llmzip.kv_cache's KIVI block with group = page; (scale, min) are stored in
            # the shapes its quantize_keys / quantize_values return, per page.
            self.kivi_cfg = KVCacheConfig(kv_dtype, residual=0, group=page)
            vgroup = min(page, head_dim)
            kshape = (num_pages, kv_heads, 1, 1, head_dim)
            vshape = (num_pages, kv_heads, page, head_dim // vgroup, 1)
            self.kp = [_scale_min(kshape, device) for _ in range(num_layers)]
            self.vp = [_scale_min(vshape, device) for _ in range(num_layers)]
            rshape = (slots, kv_heads, page, head_dim)
            self.rk = [torch.zeros(rshape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.rv = [torch.zeros(rshape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.free_slots = list(range(slots - 1, -1, -1))
        self.fp8_scales = [None] * num_layers if scales is None else [
            (torch.tensor(float(k), device=device), torch.tensor(float(v), device=device)) for k, v in scales]
        self.free = list(range(num_pages - 1, 0, -1))  # page 0 reserved

    # -- accounting ------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page)

    @property
    def kivi(self) -> bool:
        return self.bits is not None

    def bytes_per_token(self) -> float:
        """Bytes one token takes in the pool's pages over all layers (K and V, with scales);
        KIVI's residual slots (one page per running sequence) are a fixed amount on top."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.scheme.bytes_per_token(self.kv_heads, self.head_dim, elem, self.page) * self.num_layers

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"KV pool exhausted: {n} pages asked, {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self.free.extend(reversed(pages))

    def allocate_slot(self) -> int:
        """A KIVI residual slot for a sequence that starts running (-1 for other dtypes)."""
        if not self.kivi:
            return -1
        if not self.free_slots:
            raise RuntimeError("no free KV residual slot: more running sequences than the pool was built for")
        return self.free_slots.pop()

    def release_slot(self, slot: int) -> None:
        if slot >= 0:
            self.free_slots.append(slot)

    # -- reading and writing ---------------------------------------------------
    def write(self, layer: int, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store N tokens: pages, offsets [N] long; k, v [N, kv_heads, head_dim]."""
        layout = self.scheme.layout
        if layout == "model":
            self.k[layer][pages, :, offsets] = k if k.dtype == self.dtype else k.to(self.dtype)
            self.v[layer][pages, :, offsets] = v if v.dtype == self.dtype else v.to(self.dtype)
        elif layout == "int8-token":
            for store, params, x in ((self.k, self.kp, k), (self.v, self.vp, v)):
                q, scale, zero = quantize_int8(x, -1)
                store[layer][pages, :, offsets] = q
                params[layer][0][pages, :, offsets] = scale
                params[layer][1][pages, :, offsets] = zero
        else:
            if self.fp8_scales[layer] is None:
                self.fp8_scales[layer] = (fp8_scale(k), fp8_scale(v))
            ks, vs = self.fp8_scales[layer]
            self.k[layer][pages, :, offsets] = quantize_fp8(k, ks)["q"]
            self.v[layer][pages, :, offsets] = quantize_fp8(v, vs)["q"]

    def read(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [rows, kv_heads, pages*page, head_dim] for block tables `table` [rows, pages]."""
        return self._gather(layer, table, self.k, self.kp, 0), self._gather(layer, table, self.v, self.vp, 1)

    # -- KIVI (int4/int2): pages quantized when full, the open page in a residual slot --
    def write_rows(self, layer: int, rows: "RowSpans", k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [rows, kv_heads, q, D] at each row's next positions (rows.starts).
        A page quantizes once it is full; the unfilled rest stays in the row's slot."""
        page, rk, rv = self.page, self.rk[layer], self.rv[layer]
        if k.shape[2] == 1:  # decode: one token per row, vectorised over rows
            offs = rows.starts_dev % page
            rk[rows.slots_dev, :, offs] = k[:, :, 0].to(rk.dtype)
            rv[rows.slots_dev, :, offs] = v[:, :, 0].to(rv.dtype)
            if rows.filled is not None:  # rows whose open page just filled
                idx, pages = rows.filled
                self._store_pages(layer, pages, rk[rows.slots_dev[idx]], rv[rows.slots_dev[idx]])
            return
        for r in range(k.shape[0]):  # prefill chunks: a row's tokens may span many pages
            start, slot = int(rows.starts[r]), int(rows.slots[r])
            fill = start % page
            kk = torch.cat([rk[slot, :, :fill], k[r].to(rk.dtype)], dim=1)  # from the open page's start
            vv = torch.cat([rv[slot, :, :fill], v[r].to(rv.dtype)], dim=1)
            full = kk.shape[1] // page
            if full:
                first = start // page
                pages = rows.table[r, first:first + full].to(rk.device)
                H, D = kk.shape[0], kk.shape[2]
                as_pages = lambda x: x[:, :full * page].reshape(H, full, page, D).transpose(0, 1)  # noqa: E731
                self._store_pages(layer, pages, as_pages(kk), as_pages(vv))
            rest = kk.shape[1] - full * page
            rk[slot, :, :rest] = kk[:, full * page:]
            rv[slot, :, :rest] = vv[:, full * page:]

    def _store_pages(self, layer: int, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole pages k, v [n, kv_heads, page, D] into pool pages `pages` [n]."""
        for store, params, st in ((self.k, self.kp, quantize_keys(k, self.kivi_cfg)),
                                  (self.v, self.vp, quantize_values(v, self.kivi_cfg))):
            store[layer][pages] = st["q"]
            params[layer][0][pages], params[layer][1][pages] = st["scale"], st["min"]

    def read_rows(self, layer: int, rows: "RowSpans") -> tuple[torch.Tensor, torch.Tensor]:
        """KIVI read: dequantized pages with each row's open page taken from its slot."""
        table, page = rows.table_dev, self.page
        n_rows, n = table.shape

        def stored(store, params) -> dict:  # the rows' pages as llmzip.kv_cache's stored form, [rows * n, H, ...]
            return {name: take_pages(t, table).flatten(0, 1)
                    for name, t in (("q", store[layer]), ("scale", params[layer][0]), ("min", params[layer][1]))}

        pages = (n_rows, n, self.kv_heads, page, self.head_dim)
        k = dequantize_keys(stored(self.k, self.kp), self.kivi_cfg, self.dtype).view(pages)
        v = dequantize_values(stored(self.v, self.vp), self.kivi_cfg, self.dtype).view(pages)
        if rows.open is not None:  # rows with a partly written page: read it from the slot in full precision
            idx, at = rows.open
            k[idx, at] = self.rk[layer][rows.slots_dev[idx]]
            v[idx, at] = self.rv[layer][rows.slots_dev[idx]]
        shape = (n_rows, self.kv_heads, n * page, self.head_dim)
        return k.permute(0, 2, 1, 3, 4).reshape(shape), v.permute(0, 2, 1, 3, 4).reshape(shape)

    def _gather(self, layer, table, store, params, which):
        rows, n = table.shape
        x = take_pages(store[layer], table)  # [rows, n, H, page, D]
        if self.scheme.layout == "int8-token":
            scale, zero = take_pages(params[layer][0], table), take_pages(params[layer][1], table)
            x = dequantize_int8(x, scale, zero, self.dtype)
        elif self.scheme.layout == "fp8-tensor":
            x = dequantize_fp8({"q": x}, self.fp8_scales[layer][which], self.dtype)
        return x.permute(0, 2, 1, 3, 4).reshape(rows, self.kv_heads, n * self.page, self.head_dim)


def take_pages(store: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """store[table] for a contiguous pool tensor [pages, ...] and block tables [rows, n]:
    [rows, n, ...]. Rows of a 2-D view are copied whole by index_select, where advanced
    indexing computes an offset per element (on CPU 10-100x slower for a decode step's pages)."""
    flat = store.view(store.shape[0], -1).index_select(0, table.reshape(-1))
    return flat.view(*table.shape, *store.shape[1:])


def _scale_min(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A KIVI pool layer's (scale, min), both fp16."""
    return torch.zeros(shape, dtype=PARAM_DTYPE, device=device), torch.zeros(shape, dtype=PARAM_DTYPE, device=device)


class RowSpans:
    """Where one step's rows write in a KIVI pool: row r appends q tokens from position
    starts[r] into residual slot slots[r]. Built on the host (where positions are known),
    so the pool's per-step decisions (which pages fill, which rows have an open page)
    need no device sync. table: [rows, pages] block tables (host), table_dev: the same on the
    pool's device."""

    def __init__(self, table: torch.Tensor, table_dev: torch.Tensor, slots: list[int], starts: torch.Tensor, q: int,
                 page: int, device):
        self.table, self.table_dev, self.starts = table, table_dev, starts
        self.slots = torch.tensor(slots, dtype=torch.long)
        self.slots_dev, self.starts_dev = self.slots.to(device), starts.to(device)
        ends = starts + q  # tokens per row after this step
        filled = ((starts % page) + q >= page).nonzero().flatten() if q == 1 else torch.empty(0, dtype=torch.long)
        self.filled = None if not len(filled) else (
            filled.to(device), table[filled, starts[filled] // page].to(device))
        open_rows = (ends % page != 0).nonzero().flatten()
        self.open = None if not len(open_rows) else (open_rows.to(device), (ends[open_rows] // page).to(device))


def _params(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 pool layer's (scale fp16, zero point uint8) per token and head."""
    return torch.zeros(shape, dtype=PARAM_DTYPE, device=device), torch.zeros(shape, dtype=torch.uint8, device=device)


class StepCache(Cache):
    """The cache seen by one forward pass of the engine.

    table: [rows, pages] block tables (padded with page 0); pages, offsets: [rows, q]
    where each new token of each row goes. Every layer writes its new K/V there and
    reads back its rows' pages. lengths: [rows] tokens per row after this step; given
    (decode steps over an int8 pool with the paged attention kernel), update() only writes
    and attention reads the pool itself (see `paged_attention`)."""

    def __init__(self, pool: KVPool, table: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor,
                 lengths: torch.Tensor | None = None, rows: RowSpans | None = None):
        super().__init__(layers=[])
        self.pool, self.table, self.pages, self.offsets, self.lengths = pool, table, pages, offsets, lengths
        self.rows = rows  # KIVI pools: where each row writes (see RowSpans)
        self.flat_pages, self.flat_offsets = pages.reshape(-1), offsets.reshape(-1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.rows is not None:
            self.pool.write_rows(layer_idx, self.rows, key_states, value_states)
            return self.pool.read_rows(layer_idx, self.rows)
        # key_states: [rows, H, q, D] -> one entry per (row, token)
        k = key_states.transpose(1, 2).reshape(-1, *key_states.shape[1:2], key_states.shape[-1])
        v = value_states.transpose(1, 2).reshape(-1, *value_states.shape[1:2], value_states.shape[-1])
        if self.lengths is None:
            return self.update_tokens(k, v, layer_idx)
        self.pool.write(layer_idx, self.flat_pages, self.flat_offsets, k, v)
        return key_states, value_states  # not read: paged_attention reads the pool

    def update_tokens(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """update() for new K/V given token-major, [rows * q, H, D] (row-major over the
        table's rows): returns the rows' K/V [rows, H, kv_len, D]."""
        if self.rows is not None:
            rows, q = self.pages.shape
            shape = (rows, q, *k.shape[1:])
            return self.update(k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), layer_idx)
        self.pool.write(layer_idx, self.flat_pages, self.flat_offsets, k, v)
        return self.pool.read(layer_idx, self.table)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.table.shape[1] * self.pool.page

    @property
    def is_compileable(self) -> bool:
        return False


# ---------- attention straight from the int8 pool (Triton) ----------

PAGED_ATTENTION = "llmzip_paged_int8"
STEP_CACHE_KWARG = "llmzip_step_cache"  # how a forward's StepCache reaches paged_attention


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for decode steps: one query per row, keys and
    values read from the int8 pool by the Triton kernel (kernels/triton_kv_attention.py),
    dequantized in registers. query: [rows, Hq, 1, D] -> output [rows, 1, Hq, D]. The
    step's StepCache arrives as the forward's keyword argument STEP_CACHE_KWARG, which the
    model hands down to its attention functions."""
    from llmzip.kernels.triton_kv_attention import decode_attention

    cache: StepCache = kwargs[STEP_CACHE_KWARG]
    pool, layer = cache.pool, module.layer_idx
    out = decode_attention(query[:, :, 0, :], pool.k[layer], pool.kp[layer], pool.v[layer], pool.vp[layer],
                           cache.table, cache.lengths, scaling)
    return out[:, None], None


def register_paged_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_ATTENTION, paged_attention)


@contextlib.contextmanager
def paged_attention_on(model):
    """For one forward of `model`: its attention runs `paged_attention` (registered first
    with register_paged_attention). Yields kwargs(cache), the forward's extra keyword
    arguments that carry the step's cache to it."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = PAGED_ATTENTION
    try:
        yield lambda cache: {STEP_CACHE_KWARG: cache}
    finally:
        model.config._attn_implementation = saved
