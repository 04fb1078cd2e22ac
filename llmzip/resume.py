"""Per-layer progress of a calibrated run, so `--resume` continues after a crash.

The work directory (next to the output, hidden) holds, after layer i is finished:
  layer_{i:04d}.safetensors   that decoder layer's state (QuantLinear tensors, norms)
  inputs_{i+1:04d}.safetensors the inputs of layer i+1 (one tensor per sample)
  float_inputs_{i+1:04d}.safetensors  the float model's inputs of layer i+1, when the
                              run carries them (QuantConfig.float_stream)
  progress.json               {"fingerprint", "done": i + 1, "layers", "blocks"}
Files are written to a temporary name and renamed; progress.json is written last and
the previous inputs file is deleted only after it, so a kill at any moment leaves a
consistent state. The fingerprint (settings, calibration digest, targets, versions)
must match for a resume to be accepted, and resumed runs are bit-identical to
uninterrupted ones because everything downstream is recomputed from the same tensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("llmzip")


class LayerCheckpoints:
    def __init__(self, work_dir: str | Path, fingerprint: dict):
        self.dir = Path(work_dir)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))

    # -- reading -------------------------------------------------------------
    def progress(self) -> dict | None:
        """The saved progress if it matches this run's fingerprint, else None."""
        f = self.dir / "progress.json"
        if not f.is_file():
            return None
        saved = json.loads(f.read_text())
        if saved.get("fingerprint") != self.fingerprint:
            log.warning("resume: %s belongs to a run with other settings; starting over", self.dir)
            return None
        return saved

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(self.dir / f"layer_{i:04d}.safetensors")

    def inputs(self, i: int, kind: str = "inputs") -> list[torch.Tensor]:
        """The saved inputs of layer i: kind "inputs" (from the quantized layers) or
        "float_inputs" (the float model's)."""
        data = load_file(self.dir / f"{kind}_{i:04d}.safetensors")
        return [data[str(k)] for k in range(len(data))]

    # -- writing -------------------------------------------------------------
    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def save_layer(self, i: int, state: dict, next_inputs: list[torch.Tensor], layers: dict, blocks: list,
                   next_float_inputs: list[torch.Tensor] | None = None) -> None:
        self._atomic_tensors(f"layer_{i:04d}.safetensors", {k: v.contiguous() for k, v in state.items()})
        streams = {"inputs": next_inputs, "float_inputs": next_float_inputs}
        for kind, xs in streams.items():
            if xs is not None:
                self._atomic_tensors(f"{kind}_{i + 1:04d}.safetensors",
                                     {str(k): x.detach().to("cpu").contiguous() for k, x in enumerate(xs)})
        progress = {"fingerprint": self.fingerprint, "done": i + 1, "layers": layers, "blocks": blocks}
        tmp = self.dir / "progress.json.tmp"
        tmp.write_text(json.dumps(progress, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / "progress.json")
        for kind in streams:
            old = self.dir / f"{kind}_{i:04d}.safetensors"
            if old.exists():
                old.unlink()

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _atomic_tensors(self, name: str, tensors: dict) -> None:
        tmp = self.dir / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.dir / name)
