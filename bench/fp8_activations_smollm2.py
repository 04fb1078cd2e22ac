"""Perplexity cost of FP8 activations (W4A8) on SmolLM2-135M, in a CPU emulation.

One RTN W4 g64 symmetric checkpoint of SmolLM2-135M (its 576
hidden features take no group of 128), evaluated twice with
`llmzip eval ppl --activations fp16|fp8|fp8-except=NAMES` on the built-in wiki text (the last: fp8
but the named Linears keep 16-bit inputs; --except, default gate_proj,up_proj, the MLP's input). Both runs use the
reference kernel (LLMZIP_KERNEL=reference), so the only difference is the activation
rounding the W4A8 GPU kernel makes: each quantized layer's input rounded per token to e4m3
(scale = max|row| / 448). The GPU kernel computes the same function (tests/test_kernel_paths.py).

    .venv/bin/python bench/fp8_activations_smollm2.py [--max-windows 8] [--except gate_proj,up_proj]

Writes bench/results/fp8_activations_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLMZIP = [sys.executable, "-m", "llmzip"]
MAX_INCREASE = 0.01  # the bound: FP8 activations may cost at most +1% perplexity


def run_json(args: list[str], env: dict) -> dict:
    p = subprocess.run([*LLMZIP, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"llmzip {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--except", dest="keep", default="gate_proj,up_proj",
                    help="Linears that keep 16-bit inputs in the third row (comma-separated; '' for no third row)")
    a = ap.parse_args()
    env = dict(os.environ, LLMZIP_KERNEL="reference", PYTHONWARNINGS="ignore")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "w4g64")
        run_json(["quantize", "smollm2-135m", "--bits", "4", "--group-size", "64", "-o", ckpt, "--json"], env)
        acts = ["fp16", "fp8"] + ([f"fp8-except={a.keep}"] if a.keep else [])
        for act in acts:
            rows[act] = run_json(["eval", "ppl", ckpt, "--data", "wiki", "--ctx", "2048", "--max-windows",
                                  str(a.max_windows), "--activations", act, "--json"], env)
            print(act, rows[act]["ppl"], flush=True)
    inc = {act: rows[act]["ppl"] / rows["fp16"]["ppl"] - 1 for act in acts[1:]}
    machine = subprocess.run([sys.executable, str(HERE / "machine.py")], capture_output=True, text=True).stdout.strip()
    command = "python bench/fp8_activations_smollm2.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "FP8 (e4m3 per-token) activations on W4 g64, CPU emulation", "model": "SmolLM2-135M",
              "checkpoint": "llmzip quantize smollm2-135m --bits 4 --group-size 64 (RTN, symmetric)",
              "kernel": "reference (LLMZIP_KERNEL=reference)", "ppl": {k: v["ppl"] for k, v in rows.items()},
              "tokens": rows["fp8"]["tokens"], "windows": rows["fp8"]["windows"], "ctx": rows["fp8"]["ctx"],
              "dtype": rows["fp8"]["dtype"], "ppl_increase": {k: round(v, 5) for k, v in inc.items()},
              "max_increase": MAX_INCREASE, "within_bound": {k: v <= MAX_INCREASE for k, v in inc.items()},
              "machine": machine, "python": platform.python_version(), "command": command}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_activations_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# {result['benchmark']}", "",
          f"SmolLM2-135M, {result['checkpoint']}; `llmzip eval ppl --data wiki --ctx {result['ctx']} --max-windows "
          f"{a.max_windows}` ({result['tokens']} scored tokens, {result['dtype']}), {result['kernel']}.",
          f"Machine: {machine}. Command: `{command}`.", "",
          f"| activations | ppl | vs fp16 | within +{MAX_INCREASE * 100:.0f}% |", "|---|---:|---:|---|",
          f"| fp16 (the model's bf16 as is) | {rows['fp16']['ppl']:.4f} | - | - |"]
    what = {"fp8": "e4m3 per token on every quantized Linear, emulated"}
    for act in acts[1:]:
        label = what.get(act, f"e4m3 per token, but {a.keep} keep 16-bit inputs, emulated")
        md.append(f"| `{act}` ({label}) | {rows[act]['ppl']:.4f} | {inc[act] * 100:+.2f}% | "
                  f"{'yes' if inc[act] <= MAX_INCREASE else 'no'} |")
    (out / "fp8_activations_smollm2.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
