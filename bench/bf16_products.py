"""Time of bf16 work on this CPU with torch's own bf16 products, and with
`kernels.cpu_dense.fp32_products` (each bf16 product run in fp32, rounded once to bf16),
which llmzip's calibration and evaluation use where `native_bf16()` is false.

Rows: a SmolLM2-135M forward (1 x 512 tokens, logits in fp32, as perplexity runs it) and
one Hessian-sized product (2048 x 576 by 576 x 1536). Median of ROUNDS timings of each,
alternating the two modes; on a CPU with native bf16 the context does nothing, and the
ratio is ~1 by construction.

    .venv/bin/python bench/bf16_products.py

Writes bench/results/bf16_products.{json,md} (the machine in each).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmzip.kernels.cpu_dense import fp32_products, native_bf16
from llmzip.models import demo_checkpoint, load_pretrained

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

ROUNDS = 3


def timed(fn, ctx) -> float:
    with ctx():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@torch.no_grad()
def main() -> None:
    model, _ = load_pretrained(str(demo_checkpoint("smollm2-135m")))
    ids = torch.arange(1000, 1512).unsqueeze(0)
    a = torch.randn(2048, 576).bfloat16()
    b = torch.randn(576, 1536).bfloat16()
    cases = {
        "SmolLM2-135M forward, 1 x 512 tokens": lambda: model(ids, use_cache=False).logits.float(),
        "product 2048 x 576 by 576 x 1536": lambda: a @ b,
    }
    modes = {"bf16 (torch)": contextlib.nullcontext, "fp32_products": lambda: fp32_products("cpu")}
    rows = []
    for name, fn in cases.items():
        fn()  # warm-up
        times = {m: [] for m in modes}
        for _ in range(ROUNDS):
            for m, ctx in modes.items():
                times[m].append(timed(fn, ctx))
        med = {m: statistics.median(t) for m, t in times.items()}
        rows.append({"case": name, "seconds": med, "speedup": med["bf16 (torch)"] / med["fp32_products"]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "bf16 products: torch's bf16 vs kernels.cpu_dense.fp32_products",
              "machine": describe(), "native_bf16": native_bf16(), "rounds": ROUNDS,
              "torch": torch.__version__, "command": ".venv/bin/python bench/bf16_products.py", "rows": rows}
    (HERE / "results" / "bf16_products.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "", f"Machine: {result['machine']}. torch {result['torch']}. Median of "
             f"{ROUNDS}, modes alternating. Command: `{result['command']}`.", "",
             "| case | bf16 (torch) s | fp32_products s | speed-up |", "|---|---:|---:|---:|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['case']} | {s['bf16 (torch)']:.3f} | {s['fp32_products']:.3f} | {r['speedup']:.1f}x |")
    (HERE / "results" / "bf16_products.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
