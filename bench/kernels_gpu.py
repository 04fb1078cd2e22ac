"""GPU: llmzip's Triton W4 g128 kernels vs torch fp16 matmul (cuBLAS) and peers, same GPU, one run.

Shapes K x N from Llama-3-8B and 70B, M in {1, 4, 16, 64, 256, 1024}. Rows, all from the same
random W4 g128 symmetric codes and scales:
- llmzip: `triton_qmm.qmm` as the registry runs it (autotuned per M bucket; the chosen path
  and split-K reduction are recorded);
- llmzip fp8: the same with activations="fp8" (W4A8: fused per-token e4m3 quantization, then
  the FP8 tile kernel), checked against its torch reference;
- tinygemm (torch `_weight_int4pack_mm`, bf16), gemlite 0.6 (Triton; H100 configs on an
  H200) and fp8 cuBLAS (`torch._scaled_mm`, per-channel weights, a ceiling): bench/gpu_peers.py.
Each timing is the median (triton.testing.do_bench_cudagraph) of a CUDA graph that runs the
op once over each of several input sets (activations and weights), enough to overflow L2,
divided by the number of sets: launch gaps and cache hits stay out of the numbers.
Autotuning runs before capture. Speedup = fp16 time / time.

Then (--decode-layers N > 0) end-to-end decode: a Llama-3-8B-shaped model with random weights,
RTN W4 g128 vs fp16, batch 1 and 16: one decode step with a static KV cache captured as a
CUDA graph, replayed; tokens/s = batch / step time.

    python bench/kernels_gpu.py [--shapes 4] [--budget-s 240] [--decode-layers 0] [--out bench/results]

Writes kernels_<device>.json and .md under --out (rewritten after every shape).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_peers import PEERS  # noqa: E402

SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192), (4096, 4096)]  # (K, N)
MS = [1, 4, 16, 64, 256, 1024]
L2_BYTES = 50 * 2**20
TARGETS = {1: 2.5, 16: 2.0, 64: 1.3, 256: 0.7, 1024: 0.85}  # issue 26, W4A16 vs fp16 on 8192 x 8192
FP8_TARGET = 1.4  # W4A8 vs fp16 at M >= 256
TOL = {"llmzip": 2e-3, "llmzip_fp8": 2e-3, "tinygemm": 1e-2, "gemlite": 5e-3, "fp8_cublas": 8e-2}
IMPLS = ["llmzip", "llmzip_fp8", "tinygemm", "gemlite", "fp8_cublas"]


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    import triton.testing

    a = torch.empty(2**29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms / 1e3)


def random_w4(K: int, N: int, g: torch.Generator):
    """A W4 g128 symmetric QuantLinear with random codes and scales, on CUDA; also (q, scales)."""
    from llmzip.config import WeightScheme
    from llmzip.packing import pack_int32
    from llmzip.quant_linear import QuantLinear

    m = QuantLinear(K, N, WeightScheme(4, 128, True), dtype=torch.float16, device="cuda")
    q = torch.randint(-8, 8, (N, K), dtype=torch.int8, device="cuda", generator=g)
    m.weight_packed.copy_(pack_int32(q, 4))
    m.weight_scale.copy_(torch.rand(N, K // 128, device="cuda", generator=g) * 0.01 + 0.001)
    return m, q


def graph_time(fns: list) -> float:
    """Median ms of one call, from a CUDA graph that calls every fn in turn."""
    import triton.testing

    def run():
        for f in fns:
            f()

    run()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median") / len(fns)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def shape_rows(K: int, N: int, ms: list[int], g: torch.Generator) -> list[dict]:
    from llmzip.kernels import triton_fp8, triton_qmm
    from llmzip.kernels.reference import dense_weight

    w4_bytes = K * N // 2 + N * (K // 128) * 2
    copies = max(2, -(-3 * L2_BYTES // w4_bytes))
    made = [random_w4(K, N, g) for _ in range(copies)]
    layers, codes = [m for m, _ in made], [q for _, q in made]
    packed = [triton_qmm.repack(m) for m in layers]
    dense = [dense_weight(m, torch.float16) for m in layers[: max(2, -(-3 * L2_BYTES // (K * N * 2)))]]
    fns = {"llmzip": [lambda x, p=p: triton_qmm.qmm(x, p) for p in packed],
           "llmzip_fp8": [lambda x, p=p: triton_qmm.qmm(x, p, activations="fp8") for p in packed]}
    errors = {}
    for name, build in PEERS.items():
        try:
            fns[name] = [build(q, m.weight_scale) for q, m in zip(codes, layers)]
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is recorded, not fatal
            errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"{name}: {errors[name]}", flush=True)
    rows = []
    for M in ms:
        xs = [torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g) for _ in range(copies)]
        ref = xs[0].float() @ dense_weight(layers[0], torch.float16).float().t()
        ref8 = triton_fp8.w4a8_reference(xs[0].float(), dense_weight(layers[0], torch.float32)).float()
        cfg = {a: triton_qmm.choose_config(M, N, K, packed[0], xs[0], a) for a in ("fp16", "fp8")}  # autotunes
        row = {"K": K, "N": N, "M": M, "fp16_us": round(graph_time([lambda x=x, w=w: torch.matmul(x, w.t())
                                                                      for x, w in zip(xs, dense)]) * 1e3, 2),
               "llmzip_config": cfg["fp16"].__dict__, "llmzip_fp8_config": cfg["fp8"].__dict__}
        for name in IMPLS:
            if name not in fns:
                continue
            try:
                err = _rel(fns[name][0](xs[0]), ref8 if name == "llmzip_fp8" else ref)
                row[f"{name}_err"] = err
                if not err < TOL[name]:
                    raise RuntimeError(f"rel err {err:.2e} >= {TOL[name]}")
                t = graph_time([lambda x=x, f=f: f(x) for x, f in zip(xs, fns[name])])
                row[f"{name}_us"] = round(t * 1e3, 2)
                row[f"{name}_x"] = round(row["fp16_us"] / row[f"{name}_us"], 3)
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row.update({f"{k}_error": v for k, v in errors.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    del made, layers, codes, packed, dense, fns
    torch.cuda.empty_cache()
    return rows


def decode_rows(layers: int) -> list[dict]:
    """tokens/s of one captured decode step, W4 g128 vs fp16, on an 8B-shaped random model."""
    from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache

    import llmzip
    from llmzip.config import QuantConfig, WeightScheme

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
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
    ap.add_argument("--shapes", type=int, default=4, help="first N of SHAPES (default 4: 8B's and one 70B shape)")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--budget-s", type=float, default=240, help="start no new shape after this many seconds")
    ap.add_argument("--decode-layers", type=int, default=0, help="decode rows on an N-layer 8B-shaped model (0: none)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels_gpu.py needs a CUDA GPU")
    import triton

    t0 = time.perf_counter()
    device = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    meta = {"benchmark": "W4 g128 matmul vs torch fp16 matmul (cuBLAS), with peers", "device": device,
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "copy_bandwidth_GBps": round(bw / 1e9, 1),
            "command": "python bench/kernels_gpu.py " + " ".join(sys.argv[1:])}
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for K, N in SHAPES[: args.shapes]:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"budget of {args.budget_s} s spent: {K} x {N} and later shapes skipped", flush=True)
            break
        rows += shape_rows(K, N, [int(m) for m in args.ms.split(",")], g)
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        write(Path(args.out), meta, rows, [])  # the table survives a run cut short
    decode = decode_rows(args.decode_layers) if args.decode_layers > 0 else []
    lines = write(Path(args.out), meta, rows, decode)
    print("\n".join(lines))


def _cell(r: dict, name: str) -> str:
    if f"{name}_x" in r:
        return f"{r[f'{name}_x']:.2f}"
    return "err" if f"{name}_error" in r else "-"


def write(out: Path, meta: dict, rows: list[dict], decode: list[dict]) -> list[str]:
    """kernels_<device>.json and .md under `out`; returns the Markdown lines."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_" + meta["device"].replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps({**meta, "kernels": rows, "decode": decode}, indent=2) + "\n")
    lines = [f"# {meta['benchmark']}", "", f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
             f"copy bandwidth {meta['copy_bandwidth_GBps']} GB/s; `{meta['command']}`", "",
             "Speed as a multiple of fp16 `torch.matmul` (CUDA graphs over rotating inputs larger than L2, median). "
             "llmzip path: the configuration the autotuner chose for that M bucket.", "",
             "| K x N | M | fp16 us | llmzip | llmzip path | llmzip fp8 (W4A8) | tinygemm | gemlite | fp8 cuBLAS |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        c = r["llmzip_config"]
        path = c["path"] if c["path"] == "dequant" else ("gemv" if c["block_m"] == 1 else "tile") + (
            f" split {c['split_k']} {c['reduce']}" if c["split_k"] > 1 else "")
        lines.append(f"| {r['K']} x {r['N']} | {r['M']} | {r['fp16_us']} | {_cell(r, 'llmzip')} | {path} | "
                     f"{_cell(r, 'llmzip_fp8')} | {_cell(r, 'tinygemm')} | {_cell(r, 'gemlite')} | "
                     f"{_cell(r, 'fp8_cublas')} |")
    errs = sorted({f"{k[:-6]}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")})
    if errs:
        lines += ["", "Errors (err cells): " + "; ".join(errs)]
    square = {r["M"]: r for r in rows if r["K"] == r["N"] == 8192}
    checks = [f"M={m}: {square[m].get('llmzip_x', 'err')}x (target >= {t})" for m, t in TARGETS.items() if m in square]
    checks += [f"W4A8 M={m}: {square[m].get('llmzip_fp8_x', 'err')}x (target >= {FP8_TARGET})"
               for m in (256, 1024) if m in square]
    if checks:
        lines += ["", "8192 x 8192 against issue 26's targets: " + "; ".join(checks) + "."]
    if decode:
        lines += ["", "| decode (8B-shaped, random) | batch | step ms | tokens/s |", "|---|---:|---:|---:|"]
        lines += [f"| {d['model']} ({d['layers']} layers) | {d['batch']} | {d['step_ms']} | {d['tokens_per_s']} |"
                  for d in decode]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
