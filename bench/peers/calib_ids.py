"""Shared by the calibrated peer scripts: load the driver's calibration ids and prove they were used.

The driver (bench/calibrated_peers.py) writes the ids llmzip's `calibration_ids` picks as an
int64 .npy of shape [samples, seq_len]. `load` returns them with their digest (sha256 prefix of
the int64 bytes, the recipe of llmzip.calibration.calibration_ids). `Recorder` hooks the model's
input embedding and keeps every row of token ids that reaches it during calibration; `report`
then says whether the rows the model saw are exactly the file's rows.
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np


def arguments() -> argparse.ArgumentParser:
    """The calibrated peer scripts' common arguments: model, out, --calib, --bits, --group-size, --asym."""
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--calib", required=True, help="int64 .npy [samples, seq_len] written by the driver")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asym", action="store_true", help="asymmetric: a zero point per group (default symmetric)")
    return p


def digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def load(path: str) -> tuple[np.ndarray, str]:
    ids = np.load(path)
    if ids.ndim != 2 or ids.dtype != np.int64:
        raise ValueError(f"{path}: need an int64 [samples, seq_len] array, got {ids.dtype} {ids.shape}")
    return ids, digest(ids)


def dataset(ids: np.ndarray):
    """A datasets.Dataset with only an input_ids column: llm-compressor uses it as already tokenized."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist()})


class Recorder:
    """Forward pre-hook on the input embedding: records each row of input_ids the model sees."""

    def __init__(self, model):
        self.rows: list[tuple[int, ...]] = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        ids = args[0]
        for row in ids.reshape(-1, ids.shape[-1]).tolist():
            self.rows.append(tuple(row))

    def report(self, ids: np.ndarray) -> dict:
        """Rows seen (with repeats, e.g. a second pass), distinct rows, and whether the distinct
        rows seen are exactly the file's rows (so the digest of the data used is the file's)."""
        self.handle.remove()
        expected = {tuple(r) for r in ids.tolist()}
        seen = set(self.rows)
        return {"rows_seen": len(self.rows), "distinct_rows_seen": len(seen), "file_rows": len(ids),
                "same_rows_as_file": seen == expected, "file_digest": digest(ids)}
