"""Peak host memory of `llmzip quantize` on SmolLM2-135M: layer-by-layer weight loading
(the default) vs `--load-whole-model`.

Each row is one `llmzip quantize` process; peak RSS is that process's own VmHWM
(bench/procmem.py), wall s its whole run. The checkpoints of the two modes are compared
tensor by tensor (they must be bit-identical).

    .venv/bin/python bench/memory_smollm2.py

Writes bench/results/memory_smollm2.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rtn_smollm2 import LLMZIP, run_measured  # noqa: E402

RUNS = [  # label, quantize args
    ("RTN W4 g64", ["--bits", "4", "--group-size", "64"]),
    ("GPTQ W4 g64, 16 x 256 calib", ["--method", "gptq", "--bits", "4", "--group-size", "64",
                                     "--samples", "16", "--seq-len", "256"]),
]


def main() -> None:
    from llmzip.models import demo_checkpoint

    base = demo_checkpoint("smollm2-135m")
    work = HERE / ".work" / "memory"
    rows = []
    for label, args in RUNS:
        outs = {}
        for mode, extra in (("layer by layer", []), ("whole model", ["--load-whole-model"])):
            out = work / f"{label.split()[0]}-{'whole' if extra else 'lazy'}"
            summary, wall, rss = run_measured([*LLMZIP, "quantize", str(base), "-o", str(out), "--json",
                                               *args, *extra])
            outs[mode] = out
            rows.append({"run": label, "loading": mode, "peak_rss_mib": round(rss), "wall_s": round(wall, 1),
                         "in_process_peak_rss_mib": summary["peak_rss_mib"]})
            print(rows[-1], flush=True)
        a, b = (load_file(p / "model.safetensors") for p in outs.values())
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for r in rows[-2:]:
            r["checkpoints_bit_identical"] = identical
    size = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    result = {"benchmark": "peak host memory of llmzip quantize on SmolLM2-135M", "bf16_weights_mib": round(size / 2**20),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
              "command": "python bench/memory_smollm2.py", "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "",
             f"bf16 weights: {result['bf16_weights_mib']} MiB. {result['machine']}. Command: `{result['command']}`. "
             "Peak RSS of the whole quantize process (includes Python, torch and transformers, ~0.5 GiB).", "",
             "| run | weight loading | peak RSS MiB | wall s | checkpoints bit-identical |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['run']} | {r['loading']} | {r['peak_rss_mib']} | {r['wall_s']} | {r['checkpoints_bit_identical']} |"
              for r in rows]
    (HERE / "results" / "memory_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
