"""GPU: llmzip's Triton W4 g128 dequant-matmul vs torch fp16 matmul (cuBLAS), same GPU.

Shapes K x N from Llama-3-8B and 70B, M in {1, ..., 1024}. Each timing is the median
(triton.testing.do_bench_cudagraph) of a CUDA graph that runs the op once over each of
several input sets (activations and weights), enough to overflow L2, divided by the
number of sets: launch gaps and cache hits stay out of the numbers. Autotuning runs
before capture. Achieved bandwidth counts the bytes the op must move (packed weights,
scales, x, y) over the time, against the device-to-device copy rate measured first.

Then end-to-end decode: a Llama-3-8B-shaped model with random weights, RTN W4 g128
(llmzip.quantize on the GPU) vs fp16, batch 1 and 16: one decode step with a static KV
cache captured as a CUDA graph, replayed; tokens/s = batch / step time.

    python bench/kernels_gpu.py [--quick] [--out bench/results]     # on a CUDA machine

Writes kernels_<device>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]
L2_BYTES = 50 * 2**20
TARGETS = {1: 3.0, 16: 2.5}  # M -> minimum speedup on 8192 x 8192; M >= 256: 0.9 everywhere


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    import triton.testing

    a = torch.empty(2**29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms / 1e3)


def random_w4(K: int, N: int, g: torch.Generator):
    """A W4 g128 symmetric QuantLinear with random codes and scales, on CUDA."""
    from llmzip.config import WeightScheme
    from llmzip.packing import pack_int32
    from llmzip.quant_linear import QuantLinear

    m = QuantLinear(K, N, WeightScheme(4, 128, True), dtype=torch.float16, device="cuda")
    m.weight_packed.copy_(pack_int32(torch.randint(-8, 8, (N, K), dtype=torch.int8, device="cuda", generator=g), 4))
    m.weight_scale.copy_(torch.rand(N, K // 128, device="cuda", generator=g) * 0.01 + 0.001)
    return m


def graph_time(fns: list) -> float:
    """Median ms of one call, from a CUDA graph that calls every fn in turn."""
    import triton.testing

    def run():
        for f in fns:
            f()

    run()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median") / len(fns)


def kernel_rows(quick: bool) -> list[dict]:
    from llmzip.kernels import triton_qmm
    from llmzip.kernels.reference import dense_weight

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for K, N in SHAPES[:2] if quick else SHAPES:
        w4_bytes = K * N // 2 + N * (K // 128) * 2
        copies = max(2, -(-3 * L2_BYTES // w4_bytes))
        layers = [random_w4(K, N, g) for _ in range(copies)]
        packed = [triton_qmm.repack(m) for m in layers]
        dense = [dense_weight(m, torch.float16) for m in layers[: max(2, -(-3 * L2_BYTES // (K * N * 2)))]]
        err = None
        for M in MS[:4] if quick else MS:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g) for _ in range(copies)]
            if err is None or M in (1, 33, 256):
                ref = xs[0].float() @ dense_weight(layers[0], torch.float16).float().t()
                out = triton_qmm.qmm(xs[0], packed[0])
                err = ((out.float() - ref).norm() / ref.norm()).item()
                assert err < 2e-3, f"{K}x{N} M={M}: rel err {err}"
            for p, x in zip(packed, xs):
                triton_qmm.qmm(x, p)  # autotune outside the graph
            ours = graph_time([lambda x=x, p=p: triton_qmm.qmm(x, p) for x, p in zip(xs, packed)])
            fp16 = graph_time([lambda x=x, w=w: torch.matmul(x, w.t()) for x, w in zip(xs, dense)])
            moved = w4_bytes + M * K * 2 + M * N * 2
            rows.append({"K": K, "N": N, "M": M, "w4_us": round(ours * 1e3, 2), "fp16_us": round(fp16 * 1e3, 2),
                         "speedup": round(fp16 / ours, 3), "w4_bytes_per_s": moved / (ours / 1e3),
                         "rel_err": err})
            print(rows[-1], flush=True)
    return rows


def decode_rows(quick: bool) -> list[dict]:
    """tokens/s of one captured decode step, W4 g128 vs fp16, on an 8B-shaped random model."""
    from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache

    import llmzip
    from llmzip.config import QuantConfig, WeightScheme

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8 if quick else 32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096)
    out = []
    for label in ("fp16", "w4 g128"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        if label != "fp16":
            model, _ = llmzip.quantize(model, QuantConfig(weights=WeightScheme(4, 128)), progress=False, device="cuda")
        for batch in (1, 16):
            cache = StaticCache(config=cfg, max_batch_size=batch, max_cache_len=512, device="cuda",
                                dtype=torch.float16)
            prompt = torch.randint(0, cfg.vocab_size, (batch, 64), device="cuda")
            with torch.no_grad():
                model(prompt, past_key_values=cache, cache_position=torch.arange(64, device="cuda"))
                ids = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
                pos = torch.tensor([64], device="cuda")
                for _ in range(3):  # warm-up: autotune and compile outside the graph
                    model(ids, past_key_values=cache, cache_position=pos)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model(ids, past_key_values=cache, cache_position=pos)
                torch.cuda.synchronize()
                steps = 50
                t0 = time.perf_counter()
                for _ in range(steps):
                    graph.replay()
                torch.cuda.synchronize()
                step = (time.perf_counter() - t0) / steps
            out.append({"model": label, "batch": batch, "step_ms": round(step * 1e3, 3),
                        "tokens_per_s": round(batch / step, 1), "layers": cfg.num_hidden_layers})
            print(out[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, four M, 8 layers (a smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels_gpu.py needs a CUDA GPU")
    import triton

    device = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    rows = kernel_rows(args.quick)
    for r in rows:
        r["bw_fraction"] = round(r.pop("w4_bytes_per_s") / bw, 3)
    meta = {"benchmark": "Triton W4 g128 fused dequant-matmul vs torch fp16 matmul", "device": device,
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "copy_bandwidth_GBps": round(bw / 1e9, 1), "command": "python bench/kernels_gpu.py " + " ".join(sys.argv[1:])}
    write(Path(args.out), meta, rows, [])  # the kernel table survives a decode run cut short
    lines = write(Path(args.out), meta, rows, decode_rows(args.quick))
    print("\n".join(lines))


def write(out: Path, meta: dict, rows: list[dict], decode: list[dict]) -> list[str]:
    """kernels_<device>.json and .md under `out`; returns the Markdown lines."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_" + meta["device"].replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps({**meta, "kernels": rows, "decode": decode}, indent=2) + "\n")
    lines = [f"# {meta['benchmark']}", "", f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
             f"copy bandwidth {meta['copy_bandwidth_GBps']} GB/s; `{meta['command']}`", "",
             "| K x N | M | W4 us | fp16 us | speedup | W4 bandwidth / copy |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['K']} x {r['N']} | {r['M']} | {r['w4_us']} | {r['fp16_us']} | {r['speedup']} | "
              f"{r['bw_fraction']} |" for r in rows]
    lines += ["", "| decode (8B-shaped, random) | batch | step ms | tokens/s |", "|---|---:|---:|---:|"]
    lines += [f"| {d['model']} ({d['layers']} layers) | {d['batch']} | {d['step_ms']} | {d['tokens_per_s']} |"
              for d in decode]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
