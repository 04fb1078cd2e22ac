"""Where a decoder layer's output error sits, token by token, on SmolLM2-135M: the
massive activations at each sample's first position, and their share of the plain
block-output MSE that SignRound fits (`--signround-loss mse`) against their share of
the per-token relative error (`--signround-loss relative`).

For a few layers: the float layer's outputs on 4 calibration samples of 512 tokens
('lee', seed 0, as `llmzip quantize` draws them), the median and largest token norms,
and the error of the same layer with every Linear rounded to nearest at W2 g64 on the
signed symmetric grid (llmzip.primitives), per token.

    .venv/bin/python bench/massive_activations.py

Writes bench/results/massive_activations.{json,md}.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from llmzip.calibration import CalibConfig, calibration_ids
from llmzip.config import WeightScheme
from llmzip.models import load_pretrained
from llmzip.primitives import dequantize, quantize, signed_qparams

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

LAYERS = (0, 5, 10, 11, 15, 20, 29)
SCHEME = WeightScheme(2, 64)
SAMPLES, SEQ_LEN = 4, 512


def rtn(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of `layer` with every Linear's weight rounded to nearest on SCHEME's signed grid."""
    out = copy.deepcopy(layer)
    for mod in out.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.data
            g = w.reshape(w.shape[0], -1, SCHEME.group_size)
            scale = signed_qparams(g.amin(-1), g.amax(-1), SCHEME, w.dtype)
            mod.weight.data = dequantize(quantize(w, scale, None, SCHEME), scale, None, SCHEME.group_size).to(w.dtype)
    return out


def first(out):
    return out[0] if isinstance(out, tuple) else out


def main() -> None:
    model, tok = load_pretrained("smollm2-135m", dtype=torch.float32)
    ids, digest = calibration_ids(tok, CalibConfig(samples=SAMPLES, seq_len=SEQ_LEN))
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, kw, out, i=i: seen.__setitem__(i, (args, kw, first(out))),
                                         with_kwargs=True)
             for i, layer in enumerate(model.model.layers) if i in LAYERS]
    with torch.no_grad():
        model(ids, use_cache=False)  # no cache: each layer below is called again on the same inputs
    for h in hooks:
        h.remove()
    rows = []
    for i in LAYERS:
        args, kw, seen_out = seen[i]
        layer = model.model.layers[i]
        with torch.no_grad():
            ref = first(layer(*args, **kw))
        assert torch.equal(ref, seen_out), f"layer {i} called again gave other outputs"
        with torch.no_grad():
            err = (first(rtn(layer)(*args, **kw)) - ref).pow(2).sum(-1)  # [samples, seq]
        norm2 = ref.pow(2).sum(-1)
        rel = err / norm2
        at0 = torch.zeros_like(err, dtype=torch.bool)
        at0[:, 0] = True
        rows.append({
            "layer": i,
            "median_token_norm": round(norm2.sqrt().median().item(), 1),
            "first_position_norm": round(norm2[:, 0].sqrt().mean().item(), 1),
            "first_position_share_of_mse": round((err[at0].sum() / err.sum()).item(), 4),
            "first_position_share_of_relative": round((rel[at0].sum() / rel.sum()).item(), 4),
            "relative_error_first_position": round(rel[at0].mean().item(), 4),
            "relative_error_median_token": round(rel.median().item(), 4),
        })
        print(rows[-1], flush=True)
    result = {"model": "smollm2-135m (fp32)", "calibration": {"source": "lee", "samples": SAMPLES,
                                                            "seq_len": SEQ_LEN, "seed": 0, "digest": digest},
              "rounding": "W2 g64 symmetric, signed grid, round-to-nearest", "machine": describe(),
              "command": ".venv/bin/python bench/massive_activations.py", "rows": rows}
    out = HERE / "results"
    (out / "massive_activations.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Massive activations and the SignRound loss (SmolLM2-135M)",
        "",
        f"Layer outputs on {SAMPLES} x {SEQ_LEN} calibration tokens of 'lee' (digest {digest}); error of the "
        f"layer with every Linear at {result['rounding']}, per token. Command: `{result['command']}`. "
        f"Machine: {result['machine']}.",
        "",
        "| layer | median token norm | first-position norm | first position's share of the MSE | "
        "share of the relative loss | relative error, first position | relative error, median token |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['median_token_norm']} | {r['first_position_norm']} | "
                     f"{r['first_position_share_of_mse']:.4f} | {r['first_position_share_of_relative']:.4f} | "
                     f"{r['relative_error_first_position']:.4f} | {r['relative_error_median_token']:.4f} |")
    lines += ["", "The first position is 1 of each sample's 512 tokens (a share of 0.0020 if it weighed like the "
              "others). bench/results/calibrated_peers.md has what each loss gives at W2 g64.", ""]
    (out / "massive_activations.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
