"""Dense bf16 Linears on CPU: F.linear on the layer's own weight vs the prepared copy
(kernels/cpu_dense.py: oneDNN-prepacked bf16 where the CPU has native bf16 matmuls, an fp32
copy where it has not), SmolLM2-135M's shapes including its LM head, at the row counts of
decode steps (1, 2, 8, 16) and of prefill (64, 512); median of repeated calls
(torch.utils.benchmark). Each row also checks the result: the same bits as F.linear
(oneDNN), or within bf16 rounding of the fp32 product (fp32 copy).

    .venv/bin/python bench/prepack_cpu.py   # writes bench/results/prepack_cpu.{json,md}
    .venv/bin/python bench/prepack_cpu.py --out bench/results/prepack_cpu_avx2   # an AVX2 machine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from llmzip.kernels.cpu_dense import BF16_ROWS, PackedLinear, available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

# (K, N): q/k/v fused, o_proj, gate/up fused, down_proj, the LM head (vocab 49152).
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]
MS = [1, 2, 8, 16, 64, 512]
BF16_ROUNDING = 2.0**-7  # fp32 copy: each output within bf16 rounding of the fp32 product


def median_us(fn) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e6


def check(packed: PackedLinear, x: torch.Tensor, w: torch.Tensor) -> bool:
    y = packed(x)
    if packed.mode == "onednn":
        return torch.equal(y, F.linear(x, w))
    ref = F.linear(x.float(), w.float())
    return bool(((y.float() - ref).abs() <= ref.abs() * BF16_ROUNDING + 1e-6).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "prepack_cpu"))
    args = ap.parse_args()
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
            row = {"K": K, "N": N, "M": M, "mode": packed.mode, "checked": check(packed, x, lin.weight),
                   "f_linear_us": round(median_us(lambda: F.linear(x, lin.weight)), 2),
                   "prepacked_us": round(median_us(lambda: packed(x)), 2)}
            row["speedup"] = round(row["f_linear_us"] / row["prepacked_us"], 2)
            rows.append(row)
            print(row, flush=True)
    result = {"benchmark": "bf16 Linear on CPU: F.linear vs the prepared weight (kernels/cpu_dense.py)",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": describe(),
              "command": "python bench/prepack_cpu.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "", f"torch {torch.__version__}, {result['threads']} threads, "
             f"{result['machine']}; `{result['command']}`", "",
             "checked: the same bits as F.linear (onednn), or within bf16 rounding of the fp32 product (fp32; "
             f"up to {BF16_ROWS} rows run on the bf16 weight).", "",
             "| K x N | M | mode | F.linear us | prepared us | F.linear / prepared | checked |",
             "|---|---:|---|---:|---:|---:|---|"]
    lines += [f"| {r['K']} x {r['N']} | {r['M']} | {r['mode']} | {r['f_linear_us']} | {r['prepacked_us']} | "
              f"{r['speedup']} | {'yes' if r['checked'] else 'NO'} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
