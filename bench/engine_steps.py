"""What one engine step costs: tensor operations per decode step, and wall time per step
for 8 requests that arrive together (the first step prefills all of them).

    .venv/bin/python bench/engine_steps.py W4DIR [--kv auto] [--profile] [--no-prepack]

Operation counts are exact (a TorchDispatchMode counts every aten call of one decode step
with 8 running rows); step times are wall clock on this machine, so noisy.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmzip.serve.sampling import SamplingParams
from llmzip.serve.server import build_engine


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--kv", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-prepack", dest="prepack", action="store_false",
                    help="dense bf16 Linears on their own weights (EngineConfig.prepack=False)")
    ap.add_argument("--profile", action="store_true", help="also: torch.profiler's top operations over 20 decode steps")
    args = ap.parse_args()
    eng = build_engine(args.model_dir, max_num_seqs=8, max_model_len=512, kv_dtype=args.kv, prepack=args.prepack)
    prompts = [eng.tokenizer.encode(f"Write a story number {i} about a lighthouse keeper and the sea.")
               for i in range(8)]

    def burst(n: int) -> list[float]:
        for p in prompts:
            eng.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), lambda e: None)
        times = []
        while True:
            t = time.perf_counter()
            if not eng.step():
                return times
            times.append(time.perf_counter() - t)

    burst(8)  # warm-up
    times = burst(args.tokens)
    for p in prompts:
        eng.submit(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), lambda e: None)
    for _ in range(12):  # prefill, then decode until all 8 rows are running
        eng.step()
    count = CountOps()
    with count:
        eng.step()
    eng.run_until_done()
    print(f"prompt lengths {sorted({len(p) for p in prompts})}; {len(times)} steps for 8 x {args.tokens} tokens")
    print(f"first steps ms: {[round(t * 1e3, 1) for t in times[:6]]}")
    print(f"decode step ms, median: {statistics.median(times[8:]) * 1e3:.1f}")
    print(f"aten operations in one decode step with 8 rows: {sum(count.ops.values())}")
    print("most frequent:", ", ".join(f"{k} {v}" for k, v in count.ops.most_common(12)))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for p in prompts:
            eng.submit(p, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), lambda e: None)
        for _ in range(20):
            eng.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                eng.step()
        eng.run_until_done()
        print("20 decode steps, 8 rows:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
