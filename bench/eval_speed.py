"""Task evaluation speed: llmzip's built-in runner and its lm-eval adapter vs lm-eval's own `hf` model.

The same two tasks three ways, on SmolLM2-135M (bf16, CPU):
- `llmzip eval tasks` with the built-in wiki_cloze / gpqa_diamond (eval/tasks.py);
- the same items written out as local lm-eval task YAMLs (WORK/tasks: a loglikelihood task
  scored by greedy match, and a 4-way multiple-choice task with choices "(A)".."(D)" after
  the same prompt), run (a) through llmzip's adapter (`llmzip eval tasks --include-path`)
  and (b) by lm-eval 0.4.13's own HFLM in its own virtualenv (peers/lmeval_hf.py).
The three must score the same requests, so their accuracies are checked for equality.
Timings exclude model load; each run is its own process, back to back.

    bench/setup_peers.sh     # once: the lm-eval virtualenv
    LLMZIP_CACHE=$PWD/.cache/llmzip .venv/bin/python bench/eval_speed.py [--limit 100] [--batch-sizes 1,8]

Writes bench/results/eval_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LMEVAL_PY = HERE / ".venvs" / "lmeval" / "bin" / "python"


def write_tasks(d: Path) -> dict:
    """Local lm-eval versions of wiki_cloze and gpqa_diamond; returns {built-in: lm-eval name}."""
    from llmzip.eval.tasks import gpqa_items, gpqa_prompt, wiki_cloze_items

    d.mkdir(parents=True, exist_ok=True)
    with open(d / "wiki_cloze.jsonl", "w") as f:
        for context, word in wiki_cloze_items():
            f.write(json.dumps({"context": context, "word": word}) + "\n")
    with open(d / "gpqa.jsonl", "w") as f:
        for item in gpqa_items():
            f.write(json.dumps({"prompt": gpqa_prompt(item), "answer": item["answer"]}) + "\n")
    common = "output_type: {out}\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (d / "llmzip_wiki_cloze.yaml").write_text(
        "task: llmzip_wiki_cloze\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'wiki_cloze.jsonl'}\n"
        + common.format(out="loglikelihood")
        + 'doc_to_text: "{{context}}"\ndoc_to_target: "{{\' \' + word}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "llmzip_gpqa.yaml").write_text(
        "task: llmzip_gpqa\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'gpqa.jsonl'}\n"
        + common.format(out="multiple_choice")
        + 'doc_to_text: "{{prompt}}"\ndoc_to_target: answer\n'
        'doc_to_choice: ["(A)", "(B)", "(C)", "(D)"]\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return {"wiki_cloze": "llmzip_wiki_cloze", "gpqa_diamond": "llmzip_gpqa"}


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--work", default=str(HERE / ".work" / "eval_speed"))
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    if not LMEVAL_PY.exists():
        raise SystemExit(f"no {LMEVAL_PY}: run bench/setup_peers.sh")
    from llmzip.models import demo_checkpoint

    base = str(demo_checkpoint("smollm2-135m"))
    work = Path(args.work)
    tasks = write_tasks(work / "tasks")
    llmzip = [sys.executable, "-m", "llmzip", "eval", "tasks", base, "--limit", str(args.limit), "--json"]
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        for builtin, local in tasks.items():
            (mine,) = run_json(llmzip + ["--tasks", builtin, "--batch-size", str(bs)])["results"]
            adapter = run_json(llmzip + ["--tasks", local, "--include-path", str(work / "tasks"),
                                         "--batch-size", str(bs)])["results"][0]
            peer = run_json([str(LMEVAL_PY), str(HERE / "peers" / "lmeval_hf.py"), base, local, "--include-path",
                             str(work / "tasks"), "--limit", str(args.limit), "--batch-size", str(bs)])
            row = {"task": builtin, "batch_size": bs, "n": mine["n"], "tokens": mine["tokens"],
                   "llmzip_s": mine["seconds"], "adapter_s": adapter["seconds"], "lm_eval_hf_s": peer["seconds"],
                   "acc": {"llmzip": mine["value"], "adapter": adapter["value"], "lm_eval_hf": peer["results"]["acc"]},
                   "lm_eval_version": peer["version"]}
            row["same_acc"] = len(set(row["acc"].values())) == 1
            row["tokens_per_s"] = {k: round(mine["tokens"] / row[f"{k}_s"], 1)
                                   for k in ("llmzip", "adapter", "lm_eval_hf")}
            row["speedup_vs_lm_eval_hf"] = round(peer["seconds"] / mine["seconds"], 3)
            rows.append(row)
            print(row, flush=True)
    result = {"benchmark": "Task evaluation time: llmzip built-in runner and lm-eval adapter vs lm-eval's own hf model",
              "model": "smollm2-135m (bf16, CPU)", "limit": args.limit,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
              "command": "python bench/eval_speed.py " + " ".join(sys.argv[1:]),
              "tokens_note": "tokens = prompt + continuation tokens of every request (llmzip's count), the same "
                             "requests for all three", "rows": rows}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "eval_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']}", "", f"{result['model']}, first {args.limit} items per task; "
             f"{result['machine']}; `{result['command']}`", "",
             "| task | batch | llmzip s | adapter s | lm-eval hf s | llmzip tok/s | lm-eval hf tok/s | "
             "speedup vs lm-eval hf | acc (all three equal?) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['batch_size']} | {r['llmzip_s']} | {r['adapter_s']} | {r['lm_eval_hf_s']} | "
                     f"{r['tokens_per_s']['llmzip']} | {r['tokens_per_s']['lm_eval_hf']} | "
                     f"{r['speedup_vs_lm_eval_hf']}x | {r['acc']['llmzip']:.3f} ({'yes' if r['same_acc'] else 'NO'}) |")
    (res / "eval_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
