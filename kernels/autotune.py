"""Autotuning of the Triton quantized matmul on CUDA, cached on disk.

Key: (device name, M bucket, N, K, group size, bits, zero points?, act-order?, dtype,
activations). The candidates span kernels too (GEMV, tile, split-K reduced by torch or in
the kernel, dense matmul after dequantizing into a buffer): the fastest per M bucket wins.
M is bucketed (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, >=1024) so decode steps of any
batch size reuse a handful of entries. Each candidate runs under
triton.testing.do_bench; the fastest is kept in memory and in
$LLMZIP_CACHE/autotune/<device>.json, so a later process starts tuned.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from llmzip.paths import cache_dir

from .triton_layout import Config, Repacked, default_config, tile_scale

log = logging.getLogger("llmzip")
_LOCK = threading.Lock()
_MEMO: dict[str, dict] = {}
_CHOSEN: dict[tuple, Config] = {}  # (device index, M bucket, shape, layout, dtype) -> config, this process

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bucket(M: int) -> int:
    return next((b for b in BUCKETS if M <= b), BUCKETS[-1])


def candidates(M: int, K: int, r: Repacked, activations: str = "fp16") -> list[Config]:
    """The small search space for one M bucket: split-K reduced by torch or inside the kernel
    for skinny M (one row also tries the GEMV kernel), tiles, and from M = 128 the dense
    path (dequantize into a buffer, then cuBLAS; for FP8 the tile kernel on e4m3 codes)."""
    fp8 = activations == "fp8"
    if M <= 16:
        out = [Config(16, bn, bk, sk, 4, 3, red) for bn in (64, 128) for bk in (64, 128) for sk in (1, 4, 8, 16)
               for red in ("sum", "atomic") if K // sk >= bk and (sk > 1 or red == "sum")]
        if M == 1 and not fp8:
            out += [Config(1, bn, bk, sk, 4, 2, red) for bn in (128, 256) for bk in (64, 128) for sk in (4, 8, 16)
                    for red in ("sum", "atomic") if K // sk >= bk and tile_scale(r, bk)]
    elif M <= 128:
        out = [Config(bm, bn, bk, 1, 4, 3) for bm in (32, 64) for bn in (64, 128) for bk in (64, 128)]
        out += [Config(bm, 128, 128, sk, 4, 3, "atomic") for bm in (32, 64) for sk in (2, 4) if K // sk >= 128]
    else:
        out = [Config(64, 128, 64, 1, 4, 3), Config(128, 128, 64, 1, 8, 3), Config(128, 256, 64, 1, 8, 3),
               Config(128, 128, 128, 1, 8, 3)]
    if M >= 128:
        if fp8:
            out += [Config(bm, bn, 128, 1, w, st, path="dequant") for bm in (64, 128) for bn in (128, 256)
                    for w, st in ((4, 3), (8, 3))]
        else:
            out.append(Config(64, 128, 128, path="dequant"))
    if fp8:
        out = [c for c in out if c.block_m > 1 and tile_scale(r, c.block_k)]
    return out


def _cache_file(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    return cache_dir() / "autotune" / f"{name}.json"


def _table(device: torch.device) -> dict:
    f = _cache_file(device)
    key = str(f)
    if key not in _MEMO:
        try:
            _MEMO[key] = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            _MEMO[key] = {}
    return _MEMO[key]


def tuned_config(M: int, N: int, K: int, r: Repacked, x: torch.Tensor, activations: str = "fp16", *,
                 run: Callable) -> Config:
    """The fastest candidate for this M bucket and layer, timed with `run(x, r, config, activations)`
    (triton_qmm.qmm, passed in by its caller so that this module does not import it)."""
    device = x.device
    fast = (device.index, bucket(M), N, K, r.group_size, r.bits, r.zeros is not None, r.perm is not None, x.dtype,
            activations)
    hit = _CHOSEN.get(fast)  # every forward pass asks: answer without the lock, the file or a string key
    if hit is not None:
        return hit
    key = "|".join(map(str, (bucket(M), N, K, r.group_size, r.bits, r.zeros is not None, r.perm is not None,
                             str(x.dtype).removeprefix("torch."), activations)))
    with _LOCK:
        table = _table(device)
        if key in table:
            _CHOSEN[fast] = Config(**table[key])
            return _CHOSEN[fast]
        import triton.testing

        probe = torch.randn(bucket(M), K, device=device, dtype=x.dtype)
        best, best_ms = default_config(M, N, K, device, r, activations), float("inf")
        for cfg in candidates(bucket(M), K, r, activations):
            try:
                ms = triton.testing.do_bench(lambda: run(probe, r, cfg, activations), warmup=5, rep=20)
            except Exception as e:  # a config the GPU cannot run (shared memory, registers)
                log.debug("autotune: %s failed: %s", cfg, e)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        table[key] = best.__dict__
        f = _cache_file(device)
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(f)
        except OSError as e:
            log.warning("autotune: could not save %s: %s", f, e)
        log.info("autotune %s: %s (%.3f ms)", key, best, best_ms)
        _CHOSEN[fast] = best
        return best
