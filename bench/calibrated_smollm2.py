"""RTN vs GPTQ vs AWQ vs AWQ+GPTQ on SmolLM2-135M, CI-sized (no peers yet).

Calibration: 16 x 256 tokens of the built-in "lee" text (seed 0), the same samples for
every method. Perplexity: first 4 windows of 1024 tokens of the built-in "wiki" text,
the protocol of llmzip eval ppl. quant s: wall time of llmzip.quantize in this process
(load + calibrate + quantize, no save).

    .venv/bin/python bench/calibrated_smollm2.py

Writes bench/results/calibrated_smollm2.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# Import every module the runs use up front, so the numbers belong to one code state.
import llmzip.kernels.reference  # noqa: F401
import llmzip.algorithms.awq  # noqa: F401
import llmzip.resume  # noqa: F401
import llmzip.sequential  # noqa: F401
from llmzip.api import quantize
from llmzip.calibration import CalibConfig
from llmzip.config import QuantConfig, WeightScheme
from llmzip.data import load_text
from llmzip.eval.perplexity import perplexity, tokenize
from llmzip.models import demo_checkpoint, load_pretrained

HERE = Path(__file__).resolve().parent
CALIB = CalibConfig(samples=16, seq_len=256)
CTX, WINDOWS = 1024, 4
RUNS = [(m, b) for b in (4, 3) for m in ("rtn", "gptq", "awq", "awq+gptq")]


def main() -> None:
    base_dir = str(demo_checkpoint("smollm2-135m"))
    model, tok = load_pretrained(base_dir)
    ids = tokenize(tok, load_text("wiki"))
    base = perplexity(model, ids, ctx=CTX, max_windows=WINDOWS, progress=False).ppl
    rows = []
    for method, bits in RUNS:
        t0 = time.perf_counter()
        q, _ = quantize(base_dir, QuantConfig(method=method, weights=WeightScheme(bits, 64)), calib=CALIB,
                        progress=False)
        seconds = time.perf_counter() - t0
        p = perplexity(q, ids, ctx=CTX, max_windows=WINDOWS, progress=False).ppl
        rows.append({"method": method, "setting": f"W{bits} g64 sym", "ppl": p, "ppl_ratio": round(p / base, 4),
                     "quant_s": round(seconds, 1)})
        print(rows[-1], flush=True)
    result = {"benchmark": "calibrated methods on SmolLM2-135M (CI-sized calibration)",
              "calibration": CALIB.to_dict(), "ppl_protocol": f"wiki, ctx {CTX}, first {WINDOWS} windows",
              "bf16_ppl": base, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
              "command": "python bench/calibrated_smollm2.py", "rows": rows}
    (HERE / "results" / "calibrated_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "",
             f"Calibration 16 x 256 'lee' tokens; ppl on {result['ppl_protocol']} (bf16 {base:.3f}); "
             f"{result['machine']}. Command: `{result['command']}`.", "",
             "| setting | method | ppl | ppl / bf16 | quant s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['method']} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | {r['quant_s']} |"
              for r in rows]
    (HERE / "results" / "calibrated_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
