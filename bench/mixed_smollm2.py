"""Mixed precision under a bits budget (llmzip --avg-bits) on SmolLM2-135M vs bf16.

Rows: uniform W2/W3/W4 g64 (the front), and for each budget (bits per quantized
weight, scales counted as `llmzip info` counts them) the sensitivity-aware allocation
(llmzip.mixed: --avg-bits B --bits-choices 2,3,4,8) and a sensitivity-blind one at the
same budget (llmzip.mixed.blind_config: whole decoder layers at the two widths around
the budget, spread evenly over the depth; at 3.75 that is W4 and W3 alternating).
Every row rounds with the same method (--method) at group 64, symmetric.

Calibration: the first --samples of the 128 x 512 tokens of the built-in "lee" text
(seed 0, the ids of bench/calibrated_peers.py); the sensitivity pass reads the first
llmzip.mixed.SENSITIVITY_TOKENS of them. Evaluation: llmzip.eval.kld on the built-in
"wiki" text, ctx 2048, the first --windows windows: perplexity as a multiple of bf16,
mean KL(bf16 || quantized) and top-1 agreement. bf16 logits are computed once and
reused (they are bf16 tensors, kept exactly). bits/w: measured by `llmzip info`
(llmzip.info.size_report) on the saved checkpoint.

    nice -n 19 .venv/bin/python bench/mixed_smollm2.py --budgets 3.75,3.25,2.5

Writes bench/results/mixed_smollm2.{json,md} (and .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

from llmzip.api import quantize
from llmzip.calibration import CalibConfig
from llmzip.config import QuantConfig, WeightScheme
from llmzip.data import load_text
from llmzip.eval.kld import kl_divergence
from llmzip.eval.perplexity import tokenize
from llmzip.info import size_report
import llmzip.mixed
from llmzip.mixed import SENSITIVITY_TOKENS, blind_config
from llmzip.models import demo_checkpoint, load_pretrained
from llmzip.quant_linear import cached_dense_weights
from llmzip.surgery import split_targets

HERE = Path(__file__).resolve().parent
NAME = "mixed_smollm2"
GROUP = 64
CHOICES = (2, 3, 4, 8)


class CachedBase(torch.nn.Module):
    """The bf16 model's logits per window, computed on first use and then replayed."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cache = model, {}

    def forward(self, ids, use_cache=False):
        key = (ids.shape[1], ids[0, :8].tolist(), ids[0, -8:].tolist())
        key = str(key)
        if key not in self.cache:
            self.cache[key] = self.model(ids, use_cache=False).logits
        return SimpleNamespace(logits=self.cache[key])


def configs(kind: str, budget: float | None, method: str, base_dir: str) -> QuantConfig:
    cfg = QuantConfig(method=method, weights=WeightScheme(4, GROUP), bits_choices=CHOICES)
    if kind.startswith("W"):
        return replace(cfg, weights=WeightScheme(int(kind[1]), GROUP))
    cfg = replace(cfg, avg_bits=budget)
    if kind == "blind":
        model, _ = load_pretrained(base_dir)
        cfg, _ = blind_config(model, cfg, split_targets(model, cfg)[0])
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="3.75,3.25,2.5")
    p.add_argument("--uniform", default="W4,W3,W2")
    p.add_argument("--method", default="gptq")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sens-tokens", type=int, default=None,
                   help=f"tokens of the sensitivity pass (default: llmzip.mixed.SENSITIVITY_TOKENS = {SENSITIVITY_TOKENS})")
    p.add_argument("--note", default="")
    args = p.parse_args()
    if args.sens_tokens:
        llmzip.mixed.SENSITIVITY_TOKENS = args.sens_tokens
    out_json = HERE / "results" / f"{NAME}.json"
    result = json.loads(out_json.read_text()) if out_json.exists() else {"rows": [], "runs": []}
    machine = subprocess.run([sys.executable, str(HERE / "machine.py")], capture_output=True, text=True).stdout.strip()
    command = shlex.join(["python", "bench/mixed_smollm2.py", *sys.argv[1:]])
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["runs"].append({"command": command, "started": started, "machine": machine, "note": args.note})
    run_no = len(result["runs"])
    base_dir = str(demo_checkpoint("smollm2-135m"))
    base, tok = load_pretrained(base_dir)
    cached = CachedBase(base)
    ids = tokenize(tok, load_text("wiki"))
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    rows = [(kind, b) for b in budgets[:1] for kind in ("aware", "blind")]  # the headline pair first
    rows += [(u, None) for u in args.uniform.split(",") if u]
    rows += [(kind, b) for b in budgets[1:] for kind in ("aware", "blind")]
    work = Path(tempfile.mkdtemp(prefix="mixed-bench-"))
    try:
        for kind, budget in rows:
            cfg = configs(kind, budget, args.method, base_dir)
            t0 = time.perf_counter()
            q, report = quantize(base_dir, cfg, output_dir=work / "q", calib=calib, progress=True)
            seconds = time.perf_counter() - t0
            size = size_report(work / "q")
            with cached_dense_weights(q):  # dequantize each layer once: the reference kernel's function
                k = kl_divergence(cached, q, ids, ctx=args.ctx, max_windows=args.windows, progress=True)
            widths = sorted(set(size["layer_bits"].values()))
            counts = {b: sum(1 for v in size["layer_bits"].values() if v == b) for b in widths}
            row = {"setting": kind if budget is None else f"{kind} {budget}", "budget": budget,
                   "method": args.method, "bits_per_weight": size["bits_per_weight"],
                   "widths": " ".join(f"w{b}x{c}" for b, c in counts.items()),
                   "ppl": round(k.ppl, 4), "ppl_ratio": round(k.ppl_ratio, 4), "mean_kld": round(k.mean_kld, 5),
                   "top1": round(k.top1_agreement, 4), "bf16_ppl": round(k.base_ppl, 4),
                   "quant_s": round(seconds, 1), "eval": f"{k.windows} x {args.ctx}",
                   "calib": f"{args.samples} x {args.seq_len}", "run": run_no}
            if "mixed" in report:
                row["predicted_loss"] = report["mixed"]["predicted_loss"]
            key = ("setting", "method", "calib", "eval")
            result["rows"] = [r for r in result["rows"] if any(r[k] != row[k] for k in key)]
            result["rows"].append(row)
            print(row, flush=True)
            write(result)
            del q
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot(result)


def write(result: dict) -> None:
    result.update(benchmark="Mixed precision under a bits budget (--avg-bits) on SmolLM2-135M vs bf16",
                  eval="llmzip.eval.kld on the built-in wiki text, the first `eval` windows of ctx tokens")
    (HERE / "results" / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# {result['benchmark']}", "",
             "aware B: `--avg-bits B --bits-choices 2,3,4,8` (sensitivity measured per fused unit, greedy "
             "allocation, llmzip.mixed). blind B: the same budget with whole decoder layers at the two widths "
             "around it, spread evenly over the depth (llmzip.mixed.blind_config). W2/W3/W4: uniform, group 64, "
             "symmetric. bits/w: `llmzip info`'s bits per quantized weight (codes + scales). "
             f"Evaluation: {result['eval']}, against bf16. quant s: wall time of llmzip.quantize (load, "
             "sensitivity pass, calibrate, quantize, save) on a machine shared with other work (2 CPU cores). "
             "Runs:", ""]
    lines += [f"{i}. `{r['command']}` (started {r['started']}; {r['machine']}){'; ' + r['note'] if r['note'] else ''}"
              for i, r in enumerate(result["runs"], 1)]
    lines += ["", "| setting | method | bits/w | widths (Linears) | calib | eval | ppl | ppl / bf16 | mean KLD "
                  "| top-1 agree | quant s | run |", "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(result["rows"], key=lambda r: (r["method"], -r["bits_per_weight"], r["setting"])):
        lines.append(f"| {r['setting']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['widths']} | {r['calib']} "
                     f"| {r['eval']} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | {r['mean_kld']:.4f} "
                     f"| {r['top1']:.4f} | {r['quant_s']:.0f} | {r['run']} |")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        lines += ["", "No plot: matplotlib is not installed in llmzip's environment."]
    else:
        lines += ["", f"![ppl vs bits per weight]({NAME}.png)"]
    (HERE / "results" / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def plot(result: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("W", "o-"), ("aware", "s"), ("blind", "x")):
        rs = sorted((r for r in result["rows"] if r["setting"].startswith(kind)), key=lambda r: r["bits_per_weight"])
        if rs:
            ax.plot([r["bits_per_weight"] for r in rs], [r["ppl_ratio"] for r in rs], marker,
                    label={"W": "uniform g64", "aware": "--avg-bits (aware)", "blind": "blind, same budget"}[kind])
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales)")
    ax.set_ylabel("ppl / bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "results" / f"{NAME}.png", dpi=120)


if __name__ == "__main__":
    main()
