"""SignRound (llmzip --method signround) on SmolLM2-135M vs bf16: perplexity, KLD and top-1.

Calibration: 128 x 512 tokens of the built-in "lee" text (seed 0), the ids of
bench/calibrated_peers.py (digest c5260f3df5405c97). Evaluation: llmzip eval kld's
protocol (llmzip.eval.kld) on the built-in "wiki" text, ctx 2048, the first 16 windows:
perplexity as a multiple of bf16, mean KL(bf16 || quantized) and top-1 agreement.
quant s: wall time of llmzip.quantize in this process (lazy load + calibrate + quantize,
no save). Each row is written as soon as it is measured, merged into the results file.

    nice .venv/bin/python bench/signround_smollm2.py --settings 'W3 g64' --methods rtn,signround --iters 200

Writes bench/results/signround_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from llmzip.api import quantize
from llmzip.calibration import CalibConfig
from llmzip.config import ClipSearch, GPTQSettings, QuantConfig, SignRoundSettings, WeightScheme
from llmzip.data import load_text
from llmzip.eval.kld import kl_divergence
from llmzip.eval.perplexity import tokenize
from llmzip.models import demo_checkpoint, load_pretrained

HERE = Path(__file__).resolve().parent
NAME = "signround_smollm2"
SETTINGS = {"W4 g64": (4, 64), "W4 per-channel": (4, None), "W3 g64": (3, 64), "W2 g64": (2, 64)}
CALIB = CalibConfig(samples=128, seq_len=512)


def config(method: str, bits: int, group: int | None, args) -> QuantConfig:
    scheme = WeightScheme(bits, group)
    if method == "gptq-act":
        return QuantConfig(method="gptq", weights=scheme, clip=ClipSearch(),
                           gptq=GPTQSettings(act_order=True, static_groups=True))
    sr = SignRoundSettings(iters=args.iters, batch=args.batch, lr=args.lr)
    return QuantConfig(method=method, weights=scheme, signround=sr)


def label(method: str, args) -> str:
    if "signround" in method:
        lr = "" if args.lr is None else f", lr {args.lr}"
        return f"{method} ({args.iters} steps, batch {args.batch}{lr})"
    return {"gptq-act": "gptq act-order +clip"}.get(method, method)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    p.add_argument("--methods", default="rtn,signround", help="rtn, gptq-act, signround, awq+signround")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="SignRound step size (default: 1 / iters)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=CALIB.seq_len, help="calibration tokens per window (default: 512)")
    p.add_argument("--samples", type=int, default=CALIB.samples,
                   help="calibration windows: the first N of the 128 x 512 (default: all)")
    p.add_argument("--note", default="")
    args = p.parse_args()
    out_json = HERE / "results" / f"{NAME}.json"
    result = json.loads(out_json.read_text()) if out_json.exists() else {"rows": [], "runs": []}
    machine = subprocess.run([sys.executable, str(HERE / "machine.py")], capture_output=True, text=True).stdout.strip()
    command = "python bench/signround_smollm2.py " + " ".join(f"'{a}'" if " " in a else a for a in sys.argv[1:])
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["runs"].append({"command": command, "started": started, "machine": machine, "note": args.note})
    run_no = len(result["runs"])
    base_dir = str(demo_checkpoint("smollm2-135m"))
    base, tok = load_pretrained(base_dir)
    ids = tokenize(tok, load_text("wiki"))
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len)
    torch.manual_seed(0)
    for setting in args.settings.split(","):
        bits, group = SETTINGS[setting.strip()]
        for method in args.methods.split(","):
            cfg = config(method, bits, group, args)
            t0 = time.perf_counter()
            q, report = quantize(base_dir, cfg, calib=calib, progress=True)
            seconds = time.perf_counter() - t0
            k = kl_divergence(base, q, ids, ctx=args.ctx, max_windows=args.windows, progress=False)
            row = {"setting": setting.strip(), "method": label(method, args), "ppl": round(k.ppl, 4),
                   "ppl_ratio": round(k.ppl_ratio, 4), "mean_kld": round(k.mean_kld, 5),
                   "top1": round(k.top1_agreement, 4), "bf16_ppl": round(k.base_ppl, 4),
                   "quant_s": round(seconds, 1), "eval": f"{k.windows} x {args.ctx}",
                   "calib": f"{args.samples} x {args.seq_len}", "run": run_no}
            key = ("setting", "method", "calib", "eval")
            result["rows"] = [r for r in result["rows"] if any(r[k] != row[k] for k in key)]
            result["rows"].append(row)
            print(row, flush=True)
            write(result)
            del q


def write(result: dict) -> None:
    result.update(benchmark="SignRound on SmolLM2-135M vs bf16",
                  eval="llmzip.eval.kld on the built-in wiki text, the first `eval` windows of ctx tokens")
    (HERE / "results" / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# {result['benchmark']}", "",
             "Calibration: `calib` windows x tokens of 'lee' (seed 0; 128 x 512 are the ids of calibrated_peers). "
             f"Evaluation: {result['eval']}, against bf16. quant s: wall time of llmzip.quantize "
             "(lazy load + calibrate + quantize, no save) on the machine of its run, which other work "
             "shared (2 CPU cores). Runs:", ""]
    lines += [f"{i}. `{r['command']}` (started {r['started']}; {r['machine']}){'; ' + r['note'] if r['note'] else ''}"
              for i, r in enumerate(result["runs"], 1)]
    lines += ["", "| setting | method | calib | eval | ppl | bf16 ppl | ppl / bf16 | mean KLD | top-1 agree "
                  "| quant s | run |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = list(SETTINGS)
    for r in sorted(result["rows"], key=lambda r: order.index(r["setting"])):
        lines.append(f"| {r['setting']} | {r['method']} | {r['calib']} | {r['eval']} | {r['ppl']:.3f} "
                     f"| {r['bf16_ppl']:.3f} | {r['ppl_ratio']:.4f} | {r['mean_kld']:.4f} "
                     f"| {r['top1']:.4f} | {r['quant_s']} | {r['run']} |")
    (HERE / "results" / f"{NAME}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
