"""RTN and GPTQ on SmolLM2-135M with and without `--rotate hadamard`.

Settings: W4 g64, W4 per-channel, W3 g64 (symmetric, lm_head kept). GPTQ: act-order with
static groups + clip search (the best llmzip GPTQ rows of calibrated_peers.md), damping 0.01;
calibration N x 512 tokens of the built-in "lee" text, seed 0 (N = --samples, 128 default).
Perplexity: the built-in "wiki" text, windows of 2048 tokens, the first --max-windows (16),
on the quantized model in this process (bf16, CPU). Each row is written to the results file
as soon as it is measured, so an interrupted run keeps what it finished.

    LLMZIP_CACHE=$PWD/.cache/llmzip .venv/bin/python bench/rotation_smollm2.py [--samples 64]

Writes bench/results/rotation_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import llmzip.rotation  # noqa: F401  (import every module the runs use up front)
import llmzip.sequential  # noqa: F401
from llmzip.api import quantize
from llmzip.calibration import CalibConfig
from llmzip.config import GPTQSettings, QuantConfig, WeightScheme
from llmzip.data import load_text
from llmzip.eval.perplexity import perplexity, tokenize
from llmzip.models import demo_checkpoint, load_pretrained

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

SETTINGS = {"W4 g64": (4, 64), "W4 per-channel": (4, None), "W3 g64": (3, 64)}
NAME = "rotation_smollm2"


def config(method: str, bits: int, group: int | None, rotate: str | None) -> QuantConfig:
    gptq = GPTQSettings(act_order=True, static_groups=True)
    return QuantConfig(method=method, weights=WeightScheme(bits, group), gptq=gptq, rotate=rotate)


def write(result: dict) -> None:
    (HERE / "results" / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    base = result["bf16_ppl"]
    lines = [f"# {result['benchmark']}", "",
             f"Perplexity: {result['ppl_protocol']} (bf16 {base:.3f}). Calibration (GPTQ): {result['calibration']}. "
             f"GPTQ = act-order (static groups) + clip search. CPU: {result['machine']}.",
             f"Command: `{result['command']}`.", "",
             "| setting | method | rotation | ppl | ppl / bf16 | quant s |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['method']} | {r['rotate'] or '-'} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | "
              f"{r['quant_s']} |" for r in result["rows"]]
    lines += ["", "quant s: wall time of llmzip.quantize in this process (load + rotate + calibrate + quantize, no save) "
              "on a machine shared with other work; only the perplexities compare."]
    (HERE / "results" / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--methods", default="rtn,gptq")
    args = p.parse_args()
    calib = CalibConfig(samples=args.samples, seq_len=512)
    base_dir = str(demo_checkpoint("smollm2-135m"))
    model, tok = load_pretrained(base_dir)
    ids = tokenize(tok, load_text("wiki"))
    base = perplexity(model, ids, ctx=2048, max_windows=args.max_windows, progress=False).ppl
    del model
    result = {"benchmark": "Hadamard rotation (--rotate hadamard) with RTN and GPTQ on SmolLM2-135M",
              "calibration": f"{calib.samples} x {calib.seq_len} 'lee' tokens, seed {calib.seed}",
              "ppl_protocol": f"wiki, ctx 2048, first {args.max_windows} windows", "bf16_ppl": base,
              "machine": describe(), "command": "python bench/rotation_smollm2.py " + " ".join(sys.argv[1:]),
              "rows": []}
    for method in args.methods.split(","):
        for setting, (bits, group) in SETTINGS.items():
            for rotate in (None, "hadamard"):
                t0 = time.perf_counter()
                q, _ = quantize(base_dir, config(method, bits, group, rotate), calib=calib, progress=False)
                seconds = time.perf_counter() - t0
                ppl = perplexity(q, ids, ctx=2048, max_windows=args.max_windows, progress=False).ppl
                result["rows"].append({"setting": setting, "method": method, "rotate": rotate, "ppl": ppl,
                                       "ppl_ratio": round(ppl / base, 4), "quant_s": round(seconds, 1)})
                print(result["rows"][-1], flush=True)
                write(result)


if __name__ == "__main__":
    main()
