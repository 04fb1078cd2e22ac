"""Serving throughput of two llmzip checkouts, side by side on one machine.

For a change that must not cost speed (a refactor), this runs bench/serve.py's `engine`
(the engine in-process, no HTTP) and `llmzip` (`llmzip serve`) targets once per checkout per
round, alternating checkouts within each round so that drift in the machine's load hits
both alike, and reports the median over rounds of each, and the ratio after / before.
Each checkout runs with its own virtualenv's python (CHECKOUT/.venv/bin/python), so the
llmzip it imports is its own; the load generator is this checkout's bench/serve.py.

    .venv/bin/llmzip quantize smollm2-135m --method rtn --bits 4 --group-size 64 -o bench/.work/w4rtn
    git worktree add /tmp/before <commit>   # and a .venv there (make setup)
    .venv/bin/python bench/before_after.py --before /tmp/before --after . --model bench/.work/w4rtn \\
        --rounds 3 --out bench/results/engine_split

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

METRICS = ("aggregate_tok_s", "ttft_p50_s")


def one_run(checkout: Path, model: str, streams: str, max_tokens: int, per_stream: int, work: Path, tag: str) -> dict:
    out = work / tag
    py = checkout / ".venv" / "bin" / "python"
    cmd = [str(py), str(HERE / "serve.py"), "--target", f"engine:{model}", "--target", f"llmzip:{model}",
           "--streams", streams, "--max-tokens", str(max_tokens), "--requests-per-stream", str(per_stream),
           "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=checkout)
    rows = json.loads(Path(str(out) + ".json").read_text())["rows"]
    return {(r["target"].split(":")[0], int(r["streams"])): r for r in rows}


def git_head(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--after", required=True, type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list] = {k: [] for k in sides}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for side in order:
                runs[side].append(one_run(sides[side], model, args.streams, args.max_tokens,
                                          args.requests_per_stream, Path(tmp), f"{side}{r}"))
    rows = []
    for key in runs["before"][0]:
        row = {"target": key[0], "streams": key[1]}
        for side in sides:
            for m in METRICS:
                vals = [run[key][m] for run in runs[side]]
                row[f"{side}_{m}"] = statistics.median(vals)
                row[f"{side}_{m}_rounds"] = vals
        row["ratio_tok_s"] = round(row["after_aggregate_tok_s"] / row["before_aggregate_tok_s"], 3)
        paired = [a / b for a, b in zip(row["after_aggregate_tok_s_rounds"], row["before_aggregate_tok_s_rounds"])]
        row["ratio_tok_s_rounds"] = [round(x, 3) for x in paired]
        rows.append(row)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": started,
              "machine": describe(), "before": git_head(sides["before"]), "after": git_head(sides["after"]),
              "model": args.model, "max_tokens": args.max_tokens, "requests_per_stream": args.requests_per_stream,
              "rounds": args.rounds, "note": args.note, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Serving throughput, {result['before']} (before) vs {result['after']} (after)", "",
             f"`{result['command']}` (started {started}). Machine: {result['machine']}. Model: {args.model}, {args.max_tokens} tokens per request "
             f"(ignore_eos), {args.requests_per_stream} requests per stream; median of {args.rounds} rounds, the two "
             "checkouts alternating within each round.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["after / before is the ratio of the medians; the range is that of the ratio within each round "
              "(the two checkouts ran back to back).", "",
              "| target | streams | before tok/s | after tok/s | after / before | per-round range | before TTFT p50 s | "
              "after TTFT p50 s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['streams']} | {r['before_aggregate_tok_s']:.1f} | "
                     f"{r['after_aggregate_tok_s']:.1f} | {r['ratio_tok_s']:.3f} | "
                     f"{min(r['ratio_tok_s_rounds']):.3f}-{max(r['ratio_tok_s_rounds']):.3f} | {r['before_ttft_p50_s']:.4f} | "
                     f"{r['after_ttft_p50_s']:.4f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
