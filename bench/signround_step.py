"""Where the time of one SignRound step goes, on one SmolLM2-135M decoder layer.

`llmzip quantize --recipe best` spends most of its time in SignRound's steps: per decoder
layer, `iters` steps of forward + backward through the layer on `batch` calibration samples.
This script times such steps as llmzip.steps.signround runs them (an fp32 copy of the
layer where the CPU has no native bf16 matmul, else the model's dtype), splits the CPU
time of a signround() call of a few steps by operator with torch.profiler, and sets the matmuls' rate (FLOPs counted
by the profiler) beside the rate of a plain GEMM of the layer's largest shape on the same
machine. The product steps x layers x seconds per step is a lower bound of the fit
time alone (no calibration passes, load or save).

    python bench/signround_step.py [--layer 3] [--batch 8] [--seq-len 512] [--steps 6] [--table]

Writes bench/results/signround_step.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe  # noqa: E402

NAME = "signround_step"
ATTENTION = ("scaled_dot_product", "flash_attention")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeat: int = 10) -> float:
    """GFLOP/s of torch.mm [m, k] @ [k, n] in `dtype` (median of `repeat`)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / sorted(times)[len(times) // 2] / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="samples per step (--signround-batch; default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    p.add_argument("--iters", type=int, default=50, help="steps per layer of the projection (--recipe best: 40 at 4 bits and more, 50 below)")
    p.add_argument("--table", action="store_true", help="also print the profiler's top operators")
    args = p.parse_args()

    from llmzip.algorithms.signround import signround
    from llmzip.config import SignRoundSettings, WeightScheme
    from llmzip.data import load_text
    from llmzip.eval.perplexity import tokenize
    from llmzip.kernels.cpu_dense import emulated_halves, outside_products
    from llmzip.models import demo_checkpoint, load_pretrained
    from llmzip.sequential import capture_inputs
    from llmzip.steps.base import first
    from llmzip.steps.signround import to_fp32

    torch.manual_seed(0)
    model, tok = load_pretrained(str(demo_checkpoint("smollm2-135m")))
    ids = tokenize(tok, load_text("wiki"))[: args.batch * args.seq_len].view(args.batch, args.seq_len)
    inputs, kwargs = capture_inputs(model, model.model.layers, ids, "cpu")
    layer = model.model.layers[args.layer]
    x = torch.cat(inputs)
    fit_dtype = torch.float32 if x.dtype in emulated_halves(x.device) else x.dtype
    products = outside_products if fit_dtype != x.dtype else contextlib.nullcontext
    if fit_dtype != x.dtype:  # as llmzip.steps.signround: an fp32 copy of the layer and fp32 activations
        layer, x = layer.float(), x.float()
        kwargs = to_fp32(kwargs)
    for prm in layer.parameters():
        prm.requires_grad_(False)
    with torch.no_grad():
        y = first(layer(x, **kwargs))
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = {n: m.weight.data.to(model.dtype) for n, m in linears.items()}

    def forward(inp, dense):
        swapped = {f"{n}.weight": w.to(inp.dtype) for n, w in dense.items()}
        return first(torch.func.functional_call(layer, swapped, (inp,), kwargs, strict=False))

    def run(steps: int) -> None:  # one signround() call: its setup, `steps` steps, its final rounding
        with products(), torch.enable_grad():
            signround(forward, weights, x, y, WeightScheme(4, 64), SignRoundSettings(iters=steps, batch=args.batch))

    run(2)  # warm-up
    t = time.perf_counter()
    run(args.steps)
    per_step = (time.perf_counter() - t) / args.steps

    from torch.profiler import ProfilerActivity, profile

    profiled = 3
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        run(profiled)
    events = prof.key_averages()
    if args.table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in events)
    mm_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    mm_flops = sum(e.flops for e in events if e.key in MATMUL)
    attn_us = sum(e.self_cpu_time_total for e in events if any(a in e.key for a in ATTENTION))
    tokens = args.batch * args.seq_len
    widest = max(linears.values(), key=lambda m: m.weight.numel())
    gemm = gemm_rate(tokens, widest.in_features, widest.out_features, fit_dtype)
    mm_rate = mm_flops / (mm_us / 1e6) / 1e9
    layers = model.config.num_hidden_layers
    result = {
        "machine": describe(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/signround_step.py " + " ".join(sys.argv[1:]),
        "layer": args.layer, "batch": args.batch, "seq_len": args.seq_len, "fit_dtype": str(fit_dtype),
        "seconds_per_step": round(per_step, 4), "timed_steps": args.steps,
        "share": {"matmul": round(mm_us / total, 4), "attention": round(attn_us / total, 4),
                  "other": round(1 - (mm_us + attn_us) / total, 4)},
        "matmul_gflops": round(mm_rate, 1),
        "gemm_shape": [tokens, widest.in_features, widest.out_features],
        "gemm_gflops": round(gemm, 1), "matmul_vs_gemm": round(mm_rate / gemm, 3),
        "iters": args.iters, "layers": layers,
        "fit_seconds_lower_bound": round(per_step * args.iters * layers, 1),
    }
    out = HERE / "results"
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    md = [f"# One SignRound step on SmolLM2-135M layer {r['layer']}: where the time goes", "",
          f"Machine: {r['machine']}; torch {r['torch']}, {r['threads']} threads. Command: `{r['command']}` "
          f"(started {r['started']}).", "",
          f"A step is forward + backward through the decoder layer on {r['batch']} x {r['seq_len']} calibration "
          f"tokens in {r['fit_dtype']} (as llmzip.steps.signround runs it here), W4 g64. Shares: self CPU "
          f"time by operator (torch.profiler) of one signround() call of {profiled} steps, its setup and final "
          "rounding included; matmul GFLOP/s: the profiler's "
          "FLOP count of the step's matmuls over their time, beside one plain GEMM of the layer's largest "
          "shape on the same machine.", "",
          "| s / step | matmul | attention | other | step matmul GFLOP/s | plain GEMM GFLOP/s | ratio |",
          "|---:|---:|---:|---:|---:|---:|---:|",
          f"| {r['seconds_per_step']} | {r['share']['matmul']:.1%} | {r['share']['attention']:.1%} | "
          f"{r['share']['other']:.1%} | {r['matmul_gflops']} | {r['gemm_gflops']} | {r['matmul_vs_gemm']} |", "",
          f"{r['iters']} steps x {r['layers']} layers x {r['seconds_per_step']} s = "
          f"**{r['fit_seconds_lower_bound']} s** for the steps alone (`--recipe best` takes 50 steps below 4 bits, "
          "40 at 4 bits and more), before the calibration passes, loading and saving."]
    (out / f"{NAME}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
