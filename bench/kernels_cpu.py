"""CPU kernels for 4-bit layers: cpu_int4 (kernels/cpu_int4.py: AMX tiles where the CPU has
them, else torch's int4 matmul) and the reference (dequantize, then matmul) vs the bf16 dense
layer, on this CPU.

Part 1, one Linear: SmolLM2-135M's shapes (K x N) and a 4096 x 4096 one, W4 g64 symmetric,
random codes and scales, bf16 activations, M rows; median of repeated calls
(torch.utils.benchmark, which also handles warm-up).
Part 2, decode: SmolLM2-135M W4 g64 (RTN) generating 64 tokens greedily after a
32-token prompt, batch 1 and 8, with each kernel (cpu_int4 also with AMX switched off),
vs the bf16 model.

    .venv/bin/python bench/kernels_cpu.py      # writes bench/results/kernels_cpu.{json,md}
    .venv/bin/python bench/kernels_cpu.py --out bench/results/kernels_cpu_avx2   # an AVX2 machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

SHAPES = [(576, 192), (576, 576), (576, 1536), (1536, 576), (4096, 4096)]
MS = [1, 4, 8, 16, 48, 72, 96, 256, 512]


def layer(K: int, N: int):
    from llmzip.config import WeightScheme
    from llmzip.packing import pack_int32
    from llmzip.quant_linear import QuantLinear

    g = torch.Generator().manual_seed(0)
    m = QuantLinear(K, N, WeightScheme(4, 64, True), dtype=torch.bfloat16)
    m.weight_packed.copy_(pack_int32(torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=g), 4))
    m.weight_scale.copy_(torch.rand(N, K // 64, generator=g) * 0.01 + 0.001)
    return m


def median_us(fn) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e6


def linear_rows() -> list[dict]:
    from llmzip.kernels import cpu_int4, cpu_int4_amx, cpu_int4_dense, cpu_int4_torch, reference
    from llmzip.packing import unpack_int32

    rows = []
    for K, N in SHAPES:
        m = layer(K, N)
        w = reference.dense_weight(m, torch.bfloat16)
        state = cpu_int4.prepare(m)
        for M in MS:
            x = torch.randn(M, K).bfloat16()
            ref = F.linear(x.float(), w.float())
            got = cpu_int4.linear(x, m, state).float()
            err = ((got - ref).norm() / ref.norm()).item()
            row = {"K": K, "N": N, "M": M,
                   "bf16_dense_us": median_us(lambda: F.linear(x, w)),
                   "reference_us": median_us(lambda: reference.linear(x, m)),
                   "cpu_int4_us": median_us(lambda: cpu_int4.linear(x, m, state)), "cpu_int4_rel_err": err}
            c = state.torch_int4  # the kernel's paths, whichever M and CPU pick
            table = c.table.to(x.dtype)
            packed = c.packed if c.packed is not None else \
                cpu_int4_torch.int4pack(unpack_int32(m.weight_packed, 4, K, dim=1))
            row["int4_matmul_us"] = median_us(
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, c.group, table))
            row["dense_path_us"] = median_us(lambda: cpu_int4_dense.linear(x, m, state.dense))
            row["amx_us"] = median_us(lambda: cpu_int4_amx.linear(x, state.amx)) if state.amx else None
            rows.append({k: round(v, 2) if isinstance(v, float) and k.endswith("us") else v for k, v in row.items()})
            print(rows[-1], flush=True)
    return rows


def decode_rows() -> list[dict]:
    import llmzip
    from llmzip.config import QuantConfig, WeightScheme
    from llmzip.models import load_pretrained, resolve
    from llmzip.kernels import cpu_int4_amx
    from llmzip.quant_linear import QuantLinear

    available = cpu_int4_amx.available
    base, tok = load_pretrained(str(resolve("smollm2-135m")))
    q, _ = llmzip.quantize(str(resolve("smollm2-135m")), QuantConfig(weights=WeightScheme(4, 64)), progress=False)
    rows = []
    for batch in (1, 8):
        ids = torch.randint(100, 20000, (batch, 32), generator=torch.Generator().manual_seed(batch))
        kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)
        for label, model, kernel, amx in (("bf16", base, None, False), ("w4 g64 reference", q, "reference", False),
                                          ("w4 g64 cpu_int4, torch int4 matmul", q, "cpu_int4", False),
                                          ("w4 g64 cpu_int4, AMX", q, "cpu_int4", True)):
            if amx and not cpu_int4_amx.available():
                continue
            cpu_int4_amx.available = available if amx else (lambda: False)
            if kernel:
                os.environ["LLMZIP_KERNEL"] = kernel
                for m in model.modules():
                    if isinstance(m, QuantLinear):
                        m.select_kernel()
                assert {m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)} == {kernel}
            with torch.no_grad():
                model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                s = time.perf_counter() - t0
            rows.append({"model": label, "batch": batch, "seconds": round(s, 3),
                         "new_tokens_per_s": round(batch * 64 / s, 1)})
            print(rows[-1], flush=True)
    os.environ.pop("LLMZIP_KERNEL", None)
    cpu_int4_amx.available = available
    return rows


def main() -> None:
    from llmzip.kernels import cpu_int4, cpu_int4_amx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels_cpu"))
    args = ap.parse_args()

    linear = linear_rows()
    decode = decode_rows()
    result = {"benchmark": "CPU kernels for W4 g64 Linear layers vs bf16 dense", "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "machine": describe(),
              "command": "python bench/kernels_cpu.py " + " ".join(sys.argv[1:]), "linear": linear, "decode": decode}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "", f"torch {torch.__version__}, {result['threads']} threads, "
             f"{result['machine']}; `{result['command']}`", "",
             f"cpu_int4 runs the AMX kernel (kernels/cpu_int4_amx.c) where the CPU has AMX "
             f"({'here' if cpu_int4_amx.available() else 'not here'}); elsewhere torch's int4 matmul below "
             f"max({cpu_int4.DENSE_FROM}, weights / {cpu_int4.DENSE_WEIGHTS_PER_ROW}) rows and its own dequantize + "
             "matmul from there (in fp32 where bf16 matmuls are not native). Every path is timed at every M.", "",
             "| K x N | M | bf16 dense us | reference us | cpu_int4 us | AMX us | int4 matmul us | dense path us | "
             "cpu_int4 / bf16 | int4 matmul / AMX |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in linear:
        amx = r["amx_us"]
        speedup = f"{r['int4_matmul_us'] / amx:.2f}" if amx else "-"
        lines.append(f"| {r['K']} x {r['N']} | {r['M']} | {r['bf16_dense_us']} | {r['reference_us']} | "
                     f"{r['cpu_int4_us']} | {amx if amx else '-'} | {r['int4_matmul_us']} | {r['dense_path_us']} | "
                     f"{r['cpu_int4_us'] / r['bf16_dense_us']:.2f} | "
                     f"{speedup} |")
    lines += ["", "| decode (SmolLM2-135M, 32 + 64 tokens) | batch | s | new tokens/s |", "|---|---:|---:|---:|"]
    lines += [f"| {d['model']} | {d['batch']} | {d['seconds']} | {d['new_tokens_per_s']} |" for d in decode]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
