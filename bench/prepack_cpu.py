"""Dense bf16 Linears on CPU: F.linear on the layer's own weight vs oneDNN's linear on a
prepacked copy (kernels/cpu_dense.py), SmolLM2-135M's shapes including its LM head, at the
row counts of decode steps (1, 8, 16) and of prefill (64, 512); median of repeated calls
(torch.utils.benchmark). Each row also checks that both give the same bits.

    .venv/bin/python bench/prepack_cpu.py   # writes bench/results/prepack_cpu.{json,md}
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from llmzip.kernels.cpu_dense import PackedLinear, available

# (K, N): q/k/v fused, o_proj, gate/up fused, down_proj, the LM head (vocab 49152).
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]
MS = [1, 8, 16, 64, 512]


def median_us(fn) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e6


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for K, N in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16)
        ok, why = available(lin)
        if not ok:
            raise SystemExit(f"no prepacked linear here: {why}")
        packed = PackedLinear(lin)
        for M in MS:
            x = torch.randn(M, K).bfloat16()
            row = {"K": K, "N": N, "M": M, "same_bits": torch.equal(packed(x), F.linear(x, lin.weight)),
                   "f_linear_us": round(median_us(lambda: F.linear(x, lin.weight)), 2),
                   "prepacked_us": round(median_us(lambda: packed(x)), 2)}
            row["speedup"] = round(row["f_linear_us"] / row["prepacked_us"], 2)
            rows.append(row)
            print(row, flush=True)
    result = {"benchmark": "bf16 Linear on CPU: F.linear vs oneDNN prepacked weight", "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
              "command": "python bench/prepack_cpu.py " + " ".join(sys.argv[1:]), "rows": rows}
    out = Path(__file__).resolve().parent / "results"
    (out / "prepack_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "", f"torch {torch.__version__}, {result['threads']} threads, "
             f"{result['machine']}; `{result['command']}`", "",
             "| K x N | M | F.linear us | prepacked us | F.linear / prepacked | same bits |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['K']} x {r['N']} | {r['M']} | {r['f_linear_us']} | {r['prepacked_us']} | {r['speedup']} | "
              f"{'yes' if r['same_bits'] else 'NO'} |" for r in rows]
    (out / "prepack_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
