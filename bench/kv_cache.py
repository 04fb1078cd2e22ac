"""KV-cache quantization on SmolLM2-135M: perplexity and bytes per token per scheme,
with weights in bf16 and in W4 g64.

Perplexity follows `llmzip eval ppl --kv-cache` (eval/perplexity.py): windows of `--ctx`
tokens of the built-in Wikipedia text, each fed through a fresh QuantizedKVCache in
chunks of `--chunk` tokens, so every token older than the scheme's residual window is
read back quantized (int8/fp8 have no residual: every token, the current chunk's too).
FP8 uses static scales calibrated exactly as `llmzip quantize --kv-cache fp8` does (max
|K|, |V| over the calibration samples / 448) on the model being measured.

With --hf-peers, the same windows also go through transformers' own QuantizedCache
(backends quanto and hqq at 4 and 2 bits, residual 128, group 32, grouped along axis 0 (transformers'
default) and for HQQ also axis 1; and its per-tensor fp8)
with bf16 weights, in the hqq virtualenv (bench/setup_peers.sh, peers/hf_quantized_cache.py).

    LLMZIP_CACHE=$PWD/.cache/llmzip .venv/bin/python bench/kv_cache.py --w4 DIR [--windows 2] [--hf-peers]

Writes bench/results/kv_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SCHEMES = [("bf16", None), ("int8", {}), ("int4 r0", {"residual": 0}), ("int4 r32", {"residual": 32}),
           ("int4 r128", {"residual": 128}), ("int4 r128 g64", {"residual": 128, "group": 64}),
           ("int2 r128", {"residual": 128}), ("fp8 calibrated", {})]
PEERS = [("quanto", 4, 0), ("hqq", 4, 0), ("hqq", 4, 1), ("quanto", 2, 0), ("hqq", 2, 0), ("hqq", 2, 1), ("fp8", 8, 0)]


def peer_rows(model_dir: str, ids, spans, args) -> list[dict]:
    """transformers QuantizedCache rows over the same windows (bf16 weights), each in the hqq venv."""
    import numpy as np

    py = HERE / ".venvs" / "hqq" / "bin" / "python"
    work = HERE / ".work"
    work.mkdir(exist_ok=True)
    path = work / "kv_windows.npy"
    np.save(path, torch.stack([ids[s:e] for s, e, _ in spans]).numpy().astype(np.int64))
    rows = []
    for backend, bits, axis in PEERS:
        name = f"transformers {backend} " + ("per-tensor" if backend == "fp8" else f"int{bits} r128 g32 axis {axis}")
        cmd = [str(py), str(HERE / "peers" / "hf_quantized_cache.py"), model_dir, str(path), "--backend", backend,
               "--nbits", str(bits), "--residual", "128", "--group", "32", "--chunk", str(args.chunk),
               "--axis", str(axis)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        row = {"weights": "bf16", "kv": name, "ppl": None, "seconds": None, "bytes_per_token_per_layer": None,
               "bytes_ratio": None, "protocol": f"transformers QuantizedCache, chunk {args.chunk}"}
        if done.returncode != 0:
            row["skipped"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        else:
            res = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(ppl=round(res["ppl"], 4), seconds=res["seconds"], versions=res["versions"],
                       scored_tokens=res["tokens"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    from llmzip.calibration import CalibConfig, calibration_ids
    from llmzip.data import load_text
    from llmzip.eval.perplexity import perplexity, tokenize, windows
    from llmzip.kv_cache import KVCacheConfig, attach_fp8_scales, bytes_per_token, calibrate_fp8_scales
    from llmzip.models import demo_checkpoint, load_for_eval

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--w4", required=True, help="a W4 g64 llmzip checkpoint of SmolLM2-135M")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--hf-peers", action="store_true", help="add transformers QuantizedCache rows (hqq venv)")
    ap.add_argument("--out", default=str(HERE / "results" / "kv_cache"))
    ap.add_argument("--schemes", help="comma-separated subset of the llmzip schemes (bf16 is always measured)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows of OUT.json (same protocol required); rows measured now replace theirs")
    args = ap.parse_args()
    schemes = SCHEMES
    if args.schemes:
        wanted = {"bf16", *(x.strip() for x in args.schemes.split(","))}
        unknown = wanted - {n for n, _ in SCHEMES}
        if unknown:
            ap.error(f"unknown schemes {sorted(unknown)}; choose from {', '.join(n for n, _ in SCHEMES)}")
        schemes = [(n, kw) for n, kw in SCHEMES if n in wanted]
    command = " ".join(sys.argv)
    old = json.loads(Path(args.out + ".json").read_text()) if args.merge else None
    if old:
        keys = ("ctx", "windows", "chunk", "calib_samples")
        if any(old["meta"][k] != getattr(args, k) for k in keys):
            raise SystemExit(f"--merge needs the same {', '.join(keys)} as {args.out}.json")

    rows = []
    for weights, path in (("bf16", str(demo_checkpoint("smollm2-135m"))), ("W4 g64", args.w4)):
        model, tok = load_for_eval(path)
        ids = tokenize(tok, load_text("wiki"))
        calib, _ = calibration_ids(tok, CalibConfig(samples=args.calib_samples, seq_len=512))
        attach_fp8_scales(model, calibrate_fp8_scales(model, calib), torch.bfloat16)
        mc = model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        base_bytes = bytes_per_token(None, mc.num_key_value_heads, head_dim)
        for name, kw in schemes:
            cfg = None if kw is None else KVCacheConfig(name.split()[0], **kw)
            t0 = time.perf_counter()
            res = perplexity(model, ids, ctx=args.ctx, max_windows=args.windows, kv_cache=cfg, kv_chunk=args.chunk,
                             progress=False)
            per_layer = bytes_per_token(cfg, mc.num_key_value_heads, head_dim)
            rows.append({"weights": weights, "kv": name, "ppl": round(res.ppl, 4), "seconds": round(time.perf_counter() - t0, 1),
                         "bytes_per_token_per_layer": per_layer, "bytes_ratio": round(per_layer / base_bytes, 4),
                         "protocol": res.kv_cache, "scored_tokens": res.tokens, "command": command})
            print(json.dumps(rows[-1]), flush=True)
        if args.hf_peers and weights == "bf16":
            spans = windows(ids.numel(), args.ctx, None)[:args.windows]
            for r in peer_rows(path, ids, spans, args):
                if r.get("scored_tokens") not in (None, rows[0]["scored_tokens"]):
                    raise SystemExit(f"{r['kv']}: scored {r['scored_tokens']} tokens, llmzip {rows[0]['scored_tokens']}")
                rows.append(r)
    if old:  # the old rows in their order, each replaced by this run's row where there is one
        new = {(r["weights"], r["kv"]): r for r in rows}
        kept = [new.pop((r["weights"], r["kv"]), None) or {"command": old["meta"]["command"], **r}
                for r in old["rows"]]
        rows = kept + list(new.values())
    for r in rows:
        base = next(b for b in rows if b["weights"] == r["weights"] and b["kv"] == "bf16")
        r["ppl_vs_bf16_kv"] = None if r["ppl"] is None else round(r["ppl"] / base["ppl"], 4)
    meta = {"model": "SmolLM2-135M", "ctx": args.ctx, "windows": args.windows, "chunk": args.chunk,
            "calib_samples": args.calib_samples, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "command": command}
    commands = list(dict.fromkeys(r.get("command", command) for r in rows))
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| weights | KV cache | ppl | ppl / bf16 KV | KV bytes/token/layer | vs bf16 | run |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['weights']} | {r['kv']} | {r['ppl'] if r['ppl'] is not None else 'skipped: ' + r['skipped']} | "
              f"{r['ppl_vs_bf16_kv'] or '-'} | {r['bytes_per_token_per_layer'] or '-'} | {r['bytes_ratio'] or '-'} | "
              f"{commands.index(r.get('command', command)) + 1} |" for r in rows]
    Path(args.out + ".md").write_text(
        f"# KV-cache quantization, SmolLM2-135M\n\nppl on {args.windows} windows of {args.ctx} tokens (wiki), cache "
        f"fed {args.chunk} tokens at a time; FP8 scales calibrated on {args.calib_samples} x 512 'lee' tokens.\n\n"
        + "Runs (column `run`):\n\n" + "".join(f"{i}. `{c}`\n" for i, c in enumerate(commands, 1)) + "\n"
        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
