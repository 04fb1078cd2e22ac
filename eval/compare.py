"""`llmzip compare`: quality of compressed checkpoints against their base model, as a
report and a pass/fail verdict for CI.

For each compared model one pass over the text (eval/kld.py) gives its perplexity, the
base model's perplexity on the same windows, and the KL divergence / top-1 agreement
between the two. Results are cached per (base, model, protocol) under the report
directory, keyed by the content digest of both checkpoints (config + safetensors
bytes), so re-running a report only evaluates what changed.

With tasks (built-in or lm-eval, eval/tasks.py), base and models are scored on each
task too, cached per (checkpoint digest, task, limit); a task metric's drop is measured
in points on a 0-100 scale (accuracy 0.412 -> 0.398 is a drop of 1.4), for metrics where
higher is better.

Verdict: a model fails when ppl / base ppl - 1 > max_ppl_increase, mean KLD > max_kld,
or a task metric drops more than max_acc_drop points; the command exits 1 if any model
fails.

Writes report.json (everything), report.md (the table), and PNG plots when matplotlib
is installed: ppl and KLD vs bits per weight, per-layer weight error from each
checkpoint's llmzip.json, and the per-window perplexity distribution.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("llmzip")


@dataclass(frozen=True)
class Thresholds:
    max_ppl_increase: float | None = None  # fraction: 0.02 = +2 %
    max_kld: float | None = None
    max_acc_drop: float | None = None  # points on a 0-100 scale

    def failures(self, row: dict) -> list[str]:
        out = []
        if self.max_ppl_increase is not None and row["ppl_ratio"] - 1 > self.max_ppl_increase:
            out.append(f"ppl +{100 * (row['ppl_ratio'] - 1):.2f}% > +{100 * self.max_ppl_increase:.2f}%")
        if self.max_kld is not None and row["mean_kld"] > self.max_kld:
            out.append(f"mean KLD {row['mean_kld']:.4f} > {self.max_kld:.4f}")
        if self.max_acc_drop is not None:
            for t in row.get("tasks") or []:
                if t["drop_points"] is not None and t["drop_points"] > self.max_acc_drop:
                    out.append(f"{t['task']} {t['metric']} -{t['drop_points']:.2f} points > {self.max_acc_drop:g}")
        return out


def parse_fraction(text: str) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02."""
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def content_digest(path: str | Path) -> str:
    """sha256 over config.json and every .safetensors file of a checkpoint directory (or
    the name itself when it is not a local directory, e.g. a hub id)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def compare(base: str, models: list[str], data: str, ctx: int, max_windows: int | None, report_dir: str | Path,
            thresholds: Thresholds, dtype=None, progress: bool = True, tasks: list[str] | None = None,
            limit: int | None = None, batch_size: int = 1, include_path: str | None = None) -> dict:
    """Evaluate `models` against `base`; write the report; return it (see module doc)."""
    from llmzip.models import check_same_tokenizer, load_for_eval
    from llmzip.data import load_text
    from llmzip.info import size_report

    from .kld import kl_divergence
    from .perplexity import tokenize
    from .tasks import check_tasks

    tasks = list(tasks or [])
    if tasks:
        check_tasks(tasks, include_path)  # before loading anything
    report_dir = Path(report_dir)
    cache = report_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    text = load_text(data)
    base_digest = content_digest(base)
    loaded: dict = {}

    def load(name):
        if name not in loaded:
            if name != base:
                loaded.pop(next((k for k in loaded if k != base), None), None)  # one compared model at a time
            loaded[name] = load_for_eval(name, dtype)
            if name != base:
                check_same_tokenizer(load(base)[1], loaded[name][1], base, name)
        return loaded[name]

    def task_results(name, digest):
        return _task_results(name, digest, tasks, limit, batch_size, include_path, cache, load, progress)

    base_tasks = task_results(base, base_digest)
    ids = None
    rows = []
    for name in models:
        key = hashlib.sha256(json.dumps([base_digest, content_digest(name), data, ctx, max_windows,
                                         "llmzip-kld-v1"]).encode()).hexdigest()[:24]
        cached = cache / f"{key}.json"
        if cached.is_file():
            result = json.loads(cached.read_text())
            log.info("%s: cached result %s", name, cached.name)
        else:
            base_model, base_tok = load(base)
            if ids is None:
                ids = tokenize(base_tok, text)
            result = kl_divergence(base_model, load(name)[0], ids, ctx=ctx, max_windows=max_windows,
                                   progress=progress).to_dict()
            cached.write_text(json.dumps(result) + "\n")
        row = {"model": name, **result, **_checkpoint_facts(name, size_report)}
        row["tasks"] = _with_base(task_results(name, content_digest(name)), base_tasks)
        row["failures"] = thresholds.failures(row)
        rows.append(row)
    report = {
        "base": base, "data": data, "ctx": ctx, "max_windows": max_windows,
        "thresholds": {"max_ppl_increase": thresholds.max_ppl_increase, "max_kld": thresholds.max_kld,
                       "max_acc_drop": thresholds.max_acc_drop},
        "base_ppl": rows[0]["base_ppl"] if rows else None,
        "tasks": {"names": tasks, "limit": limit, "base": base_tasks},
        "rows": rows,
        "passed": all(not r["failures"] for r in rows),
    }
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (report_dir / "report.md").write_text(format_table(report) + "\n")
    report["plots"] = _plots(report, report_dir)
    return report


def _task_results(name, digest, tasks, limit, batch_size, include_path, cache: Path, load, progress) -> list[dict]:
    """TaskResult dicts of `name` on every task, each cached on its own."""
    from .tasks import run_tasks

    out = []
    for task in tasks:
        key = hashlib.sha256(json.dumps([digest, task, limit, batch_size, include_path,
                                         "llmzip-tasks-v1"]).encode()).hexdigest()[:24]
        cached = cache / f"task-{key}.json"
        if cached.is_file():
            results = json.loads(cached.read_text())
            log.info("%s: cached %s result %s", name, task, cached.name)
        else:
            model, tok = load(name)
            results = [r.to_dict() for r in run_tasks(model, tok, [task], limit=limit, progress=progress,
                                                        batch_size=batch_size, include_path=include_path)]
            cached.write_text(json.dumps(results) + "\n")
        out += results
    return out


def _with_base(results: list[dict], base: list[dict]) -> list[dict]:
    """Each task result with the base model's value and the drop in points (0-100 scale,
    positive = worse; None for metrics where lower is better)."""
    by_key = {(b["task"], b["metric"]): b for b in base}
    out = []
    for r in results:
        b = by_key.get((r["task"], r["metric"]))
        drop = None
        if b is not None and r.get("higher_is_better", True):
            drop = round(100 * (b["value"] - r["value"]), 4)
        out.append({**r, "base_value": None if b is None else b["value"], "drop_points": drop})
    return out


def _checkpoint_facts(name: str, size_report) -> dict:
    path = Path(name).expanduser()
    facts = {"bits_per_weight": None, "method": None, "layer_rel_err": None}
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        size = size_report(path)
        facts.update(bits_per_weight=size["bits_per_weight"], method=size["method"])
    meta = path / "llmzip.json"
    if meta.is_file():
        layers = json.loads(meta.read_text()).get("layers") or {}
        facts["layer_rel_err"] = {n: v["rel_err"] for n, v in layers.items() if "rel_err" in v}
    return facts


def format_table(report: dict) -> str:
    t = report["thresholds"]
    ppl_limit = "-" if t["max_ppl_increase"] is None else f"+{100 * t['max_ppl_increase']:.2f}%"
    kld_limit = "-" if t["max_kld"] is None else f"{t['max_kld']}"
    lines = [f"base: {report['base']} (ppl {report['base_ppl']:.4f}); data {report['data']}, ctx {report['ctx']}, "
             f"windows {report['max_windows'] or 'all'}; thresholds: ppl increase {ppl_limit}, mean KLD {kld_limit}",
             "",
             "| model | bits/weight | ppl | ppl / base | mean KLD | p99 KLD | top-1 agree | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        bpw = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        verdict = "FAIL: " + "; ".join(r["failures"]) if r["failures"] else "pass"
        lines.append(f"| {r['model']} | {bpw} | {r['ppl']:.4f} | {r['ppl_ratio']:.4f} | {r['mean_kld']:.5f} | "
                     f"{r['p99_kld']:.4f} | {r['top1_agreement']:.4f} | {verdict} |")
    tasks = report.get("tasks") or {}
    if tasks.get("names"):
        limit = tasks.get("limit")
        drop_limit = "-" if t.get("max_acc_drop") is None else f"{t['max_acc_drop']:g} points"
        lines += ["", f"tasks ({'first ' + str(limit) + ' items each' if limit else 'all items'}; "
                      f"max drop {drop_limit}):", "",
                  "| model | task | metric | value | stderr | drop (points) | n | s | tok/s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, results in [(f"{report['base']} (base)", tasks["base"])] + [(r["model"], r["tasks"])
                                                                              for r in report["rows"]]:
            for x in results:
                drop = "-" if x.get("drop_points") is None else f"{x['drop_points']:+.2f}"
                tps = "-" if not x.get("tokens_per_s") else f"{x['tokens_per_s']:.0f}"
                lines.append(f"| {name} | {x['task']} | {x['metric']} | {x['value']:.4f} | {x['stderr']:.4f} | "
                             f"{drop} | {x['n']} | {x['seconds']:.1f} | {tps} |")
    return "\n".join(lines)


def _plots(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots (pip install 'llmzip[eval]')")
        return []
    rows = report["rows"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    with_bits = [r for r in rows if r["bits_per_weight"]]
    if with_bits:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in ((axes[0], "ppl_ratio", "ppl / base ppl"), (axes[1], "mean_kld", "mean KLD (nats)")):
            for r in with_bits:
                ax.scatter(r["bits_per_weight"], r[key])
                ax.annotate(Path(r["model"]).name, (r["bits_per_weight"], r[key]), fontsize=7)
            ax.set_xlabel("bits per quantized weight")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        save(fig, "quality_vs_bits.png")
    layered = [r for r in rows if r["layer_rel_err"]]
    if layered:
        fig, ax = plt.subplots(figsize=(10, 4))
        for r in layered:
            ax.plot(list(r["layer_rel_err"].values()), label=Path(r["model"]).name, lw=0.8)
        ax.set_xlabel("quantized Linear (model order)")
        ax.set_ylabel("relative weight error")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "layer_error.png")
    if rows:
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.boxplot([rows[0]["base_window_ppl"]] + [r["window_ppl"] for r in rows])
        ax.set_xticks(range(1, len(rows) + 2), ["base"] + [Path(r["model"]).name for r in rows], fontsize=7)
        ax.set_ylabel("perplexity per window")
        ax.grid(alpha=0.3)
        save(fig, "window_ppl.png")
    return written
