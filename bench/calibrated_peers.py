"""Calibrated quantizers on SmolLM2-135M, side by side: llmzip GPTQ/AWQ/SignRound vs llm-compressor
GPTQ/AWQ vs HQQ vs AutoRound.

Settings (int weights, lm_head kept): W4 g64, W4 per-channel, W3 g64, W2 g64 symmetric, and W2 g64 asym
(a zero point per group; every tool but HQQ gets --asym, HQQ is asymmetric in every setting). Tools:
llmzip GPTQ, AWQ and SignRound (`llmzip quantize`; SignRound with --iters N when given; the -rot
rows with --rotate hadamard, the -refit row with --scale-refit 2, the -tune1/-tune2 rows with
--tune-epochs 1/2 at --tune-lr 1e-2, the default for every width when they were measured; -lr3e-3
with --tune-lr 3e-3), llm-compressor 0.14 GPTQModifier and AWQModifier
(peers/llmcompressor_{gptq,awq}.py, model in bf16 on CPU), HQQ (peers/hqq_quant.py:
calibration-free, written back dequantized as a bf16 checkpoint; its bits/weight is nominal),
AutoRound 0.16 with its "light" recipe (peers/autoround_quant.py: 50 iterations, on the same
calibration ids, written back dequantized as bf16; nominal bits/weight too).
With --kld, each new row also gets `llmzip eval kld` against bf16 on the same windows (mean KLD,
top-1 agreement). The .md ends with the best row per tool and setting against issue 27's targets.

Calibration: the driver picks N x L token ids once with llmzip.calibration.calibration_ids
("lee" text, seed 0) and writes them to WORK/calib.npy; the llm-compressor scripts feed exactly
those rows (checked on the model's embedding input), and llmzip's CLI picks the same ones from the
same source/seed/samples/seq-len (checked: the digest in OUT/llmzip.json equals the file's).
GPTQ: damping 0.01, block 128, act-order off for both tools, or on for both in the act-order rows
(llm-compressor's actorder="weight", its default: static groups, like llmzip's --act-order); everything else
each tool's default. llm-compressor's AWQ script turns off its page-locked activation cache, which
raises on a machine without an accelerator (see peers/llmcompressor_awq.py).

Phase 1: every quantize run back to back, each in its own process (wall seconds of the whole
process, start-up + load + calibrate + quantize + save, and its peak RSS). Phase 2: perplexity of
every checkpoint and of bf16 with one protocol, `llmzip eval ppl --data wiki --ctx 2048
--max-windows W` (llmzip loads llm-compressor's compressed-tensors checkpoints too). A tool that
fails is recorded as skipped with its error instead of a number.

    bench/setup_peers.sh                          # once: peer virtualenvs
    LLMZIP_CACHE=$PWD/.cache/llmzip .venv/bin/python bench/calibrated_peers.py [--samples 128 --seq-len 512]

Writes bench/results/calibrated_peers.{json,md} (or --results DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from machine import describe as describe_machine
from procmem import run_timed

HERE = Path(__file__).resolve().parent
LLMZIP = [sys.executable, "-m", "llmzip"]
VENVS = HERE / ".venvs"
NAME = "calibrated_peers"

# setting: (bits, group size (-1 per-channel), asymmetric). The asym setting adds a zero point per group
# (packed at the weight's width, counted in bits/weight) for every tool that runs it.
SETTINGS = {"W4 g64": (4, 64, False), "W4 per-channel": (4, -1, False), "W3 g64": (3, 64, False),
            "W2 g64": (2, 64, False), "W2 g64 asym": (2, 64, True)}
# The issue's targets: best llmzip perplexity / bf16 at each setting (targets, not measurements); the
# asym setting is held to the issue's W2 g64 target
TARGETS = {"W4 g64": 1.10, "W4 per-channel": 1.20, "W3 g64": 1.40, "W2 g64": 4.0, "W2 g64 asym": 4.0}
TOOLS = {  # key: (name, method, peer venv or None for llmzip, its package, peer script)
    "llmzip-rtn": ("llmzip", "rtn", None, None, None),
    "llmzip-gptq": ("llmzip", "gptq", None, None, None),
    "llmzip-gptq-act": ("llmzip", "gptq act-order", None, None, None),
    "llmzip-gptq-act-refit": ("llmzip", "gptq act-order refit", None, None, None),
    "llmzip-gptq-act-rot": ("llmzip", "gptq act-order rotate", None, None, None),
    "llmzip-awq": ("llmzip", "awq", None, None, None),
    "llmzip-awq+gptq": ("llmzip", "awq+gptq", None, None, None),
    # SignRound rows name their --signround-target, whose default changed from layer to model
    "llmzip-signround-model": ("llmzip", "signround model-target", None, None, None),
    "llmzip-signround-model-light": ("llmzip", "signround model-target light-lr", None, None, None),
    # the same method under another key (rows now differ by --iters anyway: row_id); kept for its 100-step row
    "llmzip-signround-model-long": ("llmzip", "signround model-target", None, None, None),
    "llmzip-signround-layer": ("llmzip", "signround layer-target", None, None, None),
    # then N epochs of end-to-end scale tuning (--tune-epochs)
    "llmzip-signround-model-tune1": ("llmzip", "signround model-target e2e-tune-1", None, None, None),
    "llmzip-signround-model-tune2": ("llmzip", "signround model-target e2e-tune-2", None, None, None),
    "llmzip-gptq-act-tune2": ("llmzip", "gptq act-order e2e-tune-2", None, None, None),
    "llmzip-signround-model-tune1-lr3e-3": ("llmzip", "signround model-target e2e-tune-1 tune-lr-3e-3", None, None,
                                            None),
    "llmzip-signround-rot-tune1": ("llmzip", "signround rotate model-target e2e-tune-1", None, None, None),
    "llmzip-signround-rot": ("llmzip", "signround rotate model-target", None, None, None),
    "llmzip-signround-rel": ("llmzip", "signround relative layer-target", None, None, None),
    "llmcompressor-gptq": ("llm-compressor", "gptq", "llmcompressor", "llmcompressor", "llmcompressor_gptq.py"),
    "llmcompressor-gptq-act": ("llm-compressor", "gptq act-order", "llmcompressor", "llmcompressor",
                               "llmcompressor_gptq.py"),
    "llmcompressor-awq": ("llm-compressor", "awq", "llmcompressor", "llmcompressor", "llmcompressor_awq.py"),
    "hqq": ("HQQ", "hqq", "hqq", "hqq", "hqq_quant.py"),
    "autoround": ("AutoRound", "autoround", "autoround", "auto_round", "autoround_quant.py"),
}
# (llmzip tool, peer tool, compare time and RSS too?) for the ratio table
PAIRS = [("llmzip-gptq", "llmcompressor-gptq", True), ("llmzip-gptq-act", "llmcompressor-gptq-act", True),
         ("llmzip-awq", "llmcompressor-awq", True),
         ("llmzip-gptq", "hqq", False), ("llmzip-awq", "hqq", False),
         ("llmzip-signround-model", "autoround", True), ("llmzip-signround-model-light", "autoround", True),
         ("llmzip-signround-model-long", "autoround", True),
         ("llmzip-signround-layer", "autoround", True), ("llmzip-signround-rot", "autoround", True),
         ("llmzip-signround-rel", "autoround", True),
         ("llmzip-signround-model-tune1", "autoround", True), ("llmzip-signround-model-tune2", "autoround", True),
         ("llmzip-gptq-act-tune2", "autoround", True), ("llmzip-signround-model-tune1-lr3e-3", "autoround", True),
         ("llmzip-signround-rot-tune1", "autoround", True),
         ("llmzip-gptq-act", "autoround", True), ("llmzip-gptq-act-rot", "autoround", True)]
# flags of the words after an llmzip method name in TOOLS
FLAGS = {"act-order": ["--act-order"], "rotate": ["--rotate", "hadamard"], "refit": ["--scale-refit", "2"],
         "relative": ["--signround-loss", "relative"], "model-target": ["--signround-target", "model"],
         "layer-target": ["--signround-target", "layer"],
         "light-lr": ["--signround-lr", "5e-3"], "e2e-tune-1": ["--tune-epochs", "1", "--tune-lr", "1e-2"],
         "e2e-tune-2": ["--tune-epochs", "2", "--tune-lr", "1e-2"], "tune-lr-3e-3": ["--tune-lr", "3e-3"]}


class Failed(Exception):
    """A run that exited non-zero; str() is its own error line."""


def error_line(text: str) -> str:
    """The exception line of the last traceback in text, with the frame that raised it
    (else the text's last line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [i for i, ln in enumerate(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln)]
    if not errs:
        return (lines or ["no output"])[-1][:500]
    frames = [m for ln in lines[: errs[-1]] if (m := re.match(r'File "(.+)", line (\d+), in (\S+)', ln))]
    where = ""
    if frames:
        path, line, func = frames[-1].groups()
        where = f" (at {path.split('site-packages/')[-1]}:{line} in {func})"
    return (lines[errs[-1]] + where)[:500]


def dist_version(venv: str, dist: str) -> str:
    """Installed version of `dist` in a peer virtualenv, from its dist-info folder name."""
    found = sorted(VENVS.glob(f"{venv}/lib/python*/site-packages/{dist}-*.dist-info"))
    return found[-1].name[len(dist) + 1 : -len(".dist-info")] if found else "?"


def run_measured(cmd: list[str], log: Path) -> tuple[dict, float, float]:
    """Run cmd, all output to log; return (last stdout line as JSON, wall seconds, peak RSS MiB
    of that process). Raises Failed with the run's error line when it exits non-zero."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w+") as err, open(log.with_suffix(".out"), "w+") as out:
        err.write("$ " + shlex.join(cmd) + "\n")
        err.flush()
        code, wall, rss = run_timed(cmd, out, err)
        out.seek(0)
        text = out.read()
        err.seek(0)
        errors = err.read()
    if code != 0:
        raise Failed(f"exit {code}: {error_line(errors + text)}")
    return json.loads(text.strip().splitlines()[-1]), wall, rss


def write_calibration(base: Path, work: Path, samples: int, seq_len: int) -> dict:
    """calibration_ids once, as int64 .npy for the peers; returns its description + digest."""
    import numpy as np
    from transformers import AutoTokenizer

    from llmzip.calibration import CalibConfig, calibration_ids

    cfg = CalibConfig(source="lee", samples=samples, seq_len=seq_len, seed=0)
    ids, digest = calibration_ids(AutoTokenizer.from_pretrained(base), cfg)
    path = work / "calib.npy"
    np.save(path, ids.numpy().astype(np.int64))
    return {**cfg.to_dict(), "digest": digest, "file": str(path)}


def takes_iters(key: str) -> bool:
    """Whether --iters reaches this tool (llmzip's SignRound rows; AutoRound runs its own recipe)."""
    name, method = TOOLS[key][:2] if key in TOOLS else ("", "")
    return name == "llmzip" and "signround" in method


def row_tag(key: str, setting: str, iters: int | None) -> str:
    """The file name of a row (its checkpoint, logs and WORK/rows entry): tool, setting and, for a
    tool that takes it, --iters: rows differing only in --iters are different rows."""
    given = iters is not None and takes_iters(key)
    return f"{key}-{setting.replace(' ', '_')}" + (f"-{iters}iters" if given else "")


def row_id(row: dict) -> tuple:
    """What --merge matches rows by: setting, tool and, for a tool that takes it, --iters (None: the
    tool's default)."""
    return row["setting"], row["tool_key"], row.get("iters") if takes_iters(row["tool_key"]) else None


def quantize(key: str, setting: str, base: Path, work: Path, calib: dict, llmzip_version: str,
             iters: int | None = None) -> dict:
    """One phase-1 run: a row with quant_s, peak_rss_mib, bits_per_weight and a calibration check,
    or a row with `skipped` set to the reason."""
    name, method, venv, dist, script = TOOLS[key]
    ver = llmzip_version if venv is None else dist_version(venv, dist)
    label = f"{name} {ver}" + ("" if method in ("hqq", "autoround") else f" {method.upper()}")
    bits, group, asym = SETTINGS[setting]
    tag = row_tag(key, setting, iters)
    out = work / tag
    log = work / "logs" / f"{tag}.log"
    row = {"setting": setting, "tool": label, "tool_key": key, "dir": str(out), "quant_s": None,
           "peak_rss_mib": None, "bits_per_weight": None, "bits_note": None, "calib_check": None,
           "skipped": None, "log": str(log)}
    shutil.rmtree(out, ignore_errors=True)
    q = ["--bits", str(bits), "--group-size", str(group)]
    if asym and method != "hqq":  # HQQ is asymmetric anyway and has no symmetric mode
        q.append("--asym")
    try:
        if venv is None:
            method, *words = method.split()
            extra = ["--damp", "0.01"] if "gptq" in method else []
            for w in words:
                extra += FLAGS[w]
            if "signround" in method and iters is not None:
                extra += ["--iters", str(iters)]
            summary, wall, rss = run_measured(
                [*LLMZIP, "quantize", str(base), "-o", str(out), "--method", method, *q, *extra, "--calib",
                 calib["source"], "--samples", str(calib["samples"]), "--seq-len", str(calib["seq_len"]),
                 "--seed", str(calib["seed"]), "--json"], log)
            row["bits_per_weight"] = summary["bits_per_weight"]
            meta = json.loads((out / "llmzip.json").read_text())
            used = (meta["calibration"] or {}).get("digest")
            if meta["config"].get("clip"):  # GPTQ's default clip search (old rows lack the key)
                row["tool"] += " +clip"
            if "signround" in method:
                row["tool"] += f" ({iters if iters is not None else 'default'} iters)"
            if method != "rtn":  # RTN reads no data
                row["calib_check"] = {"digest": used, "same_as_file": used == calib["digest"]}
        else:
            py = VENVS / venv / "bin" / "python"
            if not py.exists():
                raise Failed(f"no {py.relative_to(HERE.parent)}: run bench/setup_peers.sh")
            cmd = [str(py), str(HERE / "peers" / script), str(base), str(out), *q]
            if method != "hqq":
                cmd += ["--calib", calib["file"]]
            if method.endswith(" act-order"):
                cmd += ["--actorder", "weight"]
            summary, wall, rss = run_measured(cmd, log)
            if method == "hqq":
                row["bits_per_weight"] = summary["bits_per_weight"]
                row["bits_note"] = "nominal: nbits + 16-bit scale + 16-bit zero per group (HQQ is asymmetric)"
            elif summary.get("bits_per_weight_nominal"):  # a peer written back dequantized (AutoRound)
                row["bits_per_weight"] = summary["bits_per_weight"]
                row["bits_note"] = summary["bits_note"]
                if summary.get("recipe"):
                    row["tool"] += f" {summary['recipe']}"
                seen = summary["calibration"]
                row["calib_check"] = {**seen, "same_as_file": seen["same_rows_as_file"]
                                      and seen["file_digest"] == calib["digest"]}
            else:
                info, _, _ = run_measured([*LLMZIP, "info", str(out), "--json"], work / "logs" / f"{tag}-info.log")
                row["bits_per_weight"] = info["bits_per_weight"]
                seen = summary["calibration"]
                row["calib_check"] = {**seen, "same_as_file": seen["same_rows_as_file"]
                                      and seen["file_digest"] == calib["digest"]}
        row.update(quant_s=round(wall, 2), peak_rss_mib=round(rss))
    except Failed as e:
        row["skipped"] = str(e)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of: {', '.join(TOOLS)}")
    ap.add_argument("--work", default=str(HERE / ".work"))
    ap.add_argument("--results", default=str(HERE / "results"), help="where the .json and .md go")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json in --results")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse rows already measured in WORK/rows (same calibration) instead of measuring again")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other settings/tools already in --results (same calibration and "
                         "protocol required); rows of this run replace rows with the same setting and tool")
    ap.add_argument("--note", help="a remark on this run's conditions, printed with its command")
    ap.add_argument("--iters", type=int, default=None,
                    help="llmzip SignRound steps per layer (default: llmzip's own default)")
    ap.add_argument("--kld", action="store_true",
                    help="also `llmzip eval kld` of each new row against bf16 (same windows): mean KLD and top-1 "
                         "agreement")
    args = ap.parse_args()
    results = Path(args.results)
    if args.render_only:
        render(json.loads((results / f"{NAME}.json").read_text()), results)
        return
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    for t in tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}; choose from {', '.join(TOOLS)}")

    import llmzip
    from llmzip.models import demo_checkpoint

    base = demo_checkpoint("smollm2-135m")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run = {"id": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
           "command": "python bench/calibrated_peers.py " + shlex.join(sys.argv[1:]), "llmzip": llmzip.__version__,
           "rss": "VmHWM", "machine": describe_machine(), **({"note": args.note} if args.note else {})}
    calib = write_calibration(base, work, args.samples, args.seq_len)
    print("calibration", calib, flush=True)
    # Phase 1: every quantization, back to back, so their timings share quiet conditions. Each
    # measured row is also kept in WORK/rows/, so that --reuse can pick up an interrupted run.
    rows = [{"setting": "bf16", "tool": "-", "tool_key": "bf16", "dir": str(base), "quant_s": None,
             "peak_rss_mib": None, "bits_per_weight": 16.0, "bits_note": None, "calib_check": None,
             "skipped": None, "run": run}]
    (work / "rows").mkdir(exist_ok=True)
    for s in settings:
        for t in tools:
            kept = work / "rows" / f"{row_tag(t, s, args.iters)}.json"
            old = json.loads(kept.read_text()) if args.reuse and kept.is_file() else None
            if (old and old.get("calib_digest") == calib["digest"] and Path(old["dir"]).is_dir()
                    and old.get("iters") == args.iters):
                rows.append(old)
                print("reused", kept, flush=True)
                continue
            rows.append({**quantize(t, s, base, work, calib, llmzip.__version__, args.iters), "run": run,
                         "calib_digest": calib["digest"], "iters": args.iters})
            kept.write_text(json.dumps(rows[-1], indent=1))
            print({k: rows[-1][k] for k in ("setting", "tool", "quant_s", "peak_rss_mib", "bits_per_weight",
                                            "calib_check", "skipped")}, flush=True)
    # Phase 2: perplexity of every checkpoint with one protocol (llmzip loads the peers' too).
    for r in rows:
        if r["skipped"]:
            continue
        tag = f"ppl-{r['tool_key']}-{r['setting'].replace(' ', '_')}"
        try:
            p, _, _ = run_measured([*LLMZIP, "eval", "ppl", r["dir"], "--data", "wiki", "--ctx", "2048",
                                    "--max-windows", str(args.max_windows), "--json"], work / "logs" / f"{tag}.log")
        except Failed as e:
            r["skipped"] = f"eval: {e}"
            continue
        r.update(ppl=p["ppl"], eval_tokens=p["tokens"], eval_dtype=p["dtype"])
        print(r["setting"], r["tool"], r["ppl"], flush=True)
        if args.kld and r["tool_key"] != "bf16":
            try:
                k, _, _ = run_measured([*LLMZIP, "eval", "kld", str(base), r["dir"], "--data", "wiki", "--ctx",
                                        "2048", "--max-windows", str(args.max_windows), "--json"],
                                       work / "logs" / f"k{tag}.log")
                r.update(mean_kld=k["mean_kld"], top1_agreement=k["top1_agreement"], kld_tokens=k["tokens"])
                print("  KLD", r["mean_kld"], "top-1", r["top1_agreement"], flush=True)
            except Failed as e:
                r["kld_skipped"] = str(e)
    for r in rows:
        r["ppl_ratio"] = round(r["ppl"] / rows[0]["ppl"], 4) if r.get("ppl") else None
    b = rows[0]
    result = {
        "benchmark": "Calibrated weight-only quantization of SmolLM2-135M: llmzip vs llm-compressor vs HQQ",
        "calibration": {**calib, "file": "WORK/calib.npy",
                        "all_calibrated_rows_used_it": all((r["calib_check"] or {}).get("same_as_file", True)
                                                           for r in rows)},
        "gptq": "damping 0.01, block 128, act-order off for both tools, or on for both (llm-compressor "
                "actorder=\"weight\") in the act-order rows; other settings each tool's default (llmzip "
                "rows marked +clip searched clipped scales on the layer-output error, llmzip's GPTQ default)",
        "ppl_protocol": f"llmzip eval ppl --data wiki --ctx 2048 --max-windows {args.max_windows} "
                        f"({b.get('eval_tokens')} scored tokens, {b.get('eval_dtype')})",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": run["command"],
        "rows": rows,
    }
    old_file = results / f"{NAME}.json"
    if args.merge and old_file.is_file():
        old = json.loads(old_file.read_text())
        same = old["calibration"]["digest"] == calib["digest"] and old["ppl_protocol"] == result["ppl_protocol"]
        if not same:
            raise SystemExit(f"--merge: {old_file} used other calibration or ppl protocol; not merging")
        earlier = {"id": "earlier", "command": old["command"]}  # results written before rows named their run
        mine = {row_id(r) for r in rows}
        kept = [r if isinstance(r.get("run"), dict) else {**r, "run": earlier}
                for r in old["rows"] if row_id(r) not in mine]
        order = {k: i for i, k in enumerate([*SETTINGS, *TOOLS])}
        result["rows"] = [rows[0]] + sorted([r for r in kept if r["tool_key"] != "bf16"] + rows[1:],
                                            key=lambda r: (order[r["setting"]], order[r["tool_key"]],
                                                           r.get("iters") or 0))
        result["command"] = old["command"] + " ; " + result["command"]
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    render(result, results)


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _run(row: dict, first_command: str = "") -> dict:
    """The run that measured a row: {"id": start time, "command"} (older results: their first command)."""
    r = row.get("run")
    return r if isinstance(r, dict) else {"id": "earlier", "command": first_command}


def _best(rows: list[dict], setting: str, prefix: str) -> dict | None:
    """The measured row of lowest perplexity among the tools whose key starts with prefix."""
    found = [r for r in rows if r["setting"] == setting and r["tool_key"].startswith(prefix) and r.get("ppl")]
    return min(found, key=lambda r: r["ppl"]) if found else None


def summary(rows: list[dict]) -> list[str]:
    """The issue's table: per setting, the best llmzip row, HQQ, the best llm-compressor row and AutoRound
    (ppl / bf16), and whether llmzip's best meets its target and is no worse than AutoRound."""
    lines = ["", "Best per tool and setting (ppl / bf16; the method of the best row in brackets), against the "
             "targets of issue 27 (best llmzip at or under the target, and no worse than AutoRound):", "",
             "| setting | best llmzip | HQQ | best llm-compressor | AutoRound | target | target met | "
             "llmzip <= AutoRound |", "|---|---|---|---|---|---:|---|---|"]

    def cell(r: dict | None, name: str) -> str:
        if r is None:
            return "not measured"
        method = r["tool"].split(" ", 2)[2] if r["tool"].count(" ") >= 2 else ""
        return f"{r['ppl_ratio']:.4f}" + (f" ({method})" if method and name != "hqq" else "")

    for s in [s for s in TARGETS if any(r["setting"] == s for r in rows)]:
        ours, ar = _best(rows, s, "llmzip"), _best(rows, s, "autoround")
        hqq, lc = _best(rows, s, "hqq"), _best(rows, s, "llmcompressor")
        met = "-" if ours is None else ("yes" if ours["ppl_ratio"] <= TARGETS[s] else "no")
        vs = "-" if ours is None or ar is None else ("yes" if ours["ppl"] <= ar["ppl"] else "no")
        lines.append(f"| {s} | {cell(ours, 'llmzip')} | {cell(hqq, 'hqq')} | {cell(lc, 'lc')} | "
                     f"{cell(ar, 'autoround')} | <= {TARGETS[s]:.2f} | {met} | {vs} |")
    return lines


def pair_line(lines: list[str], setting: str, a: dict, p: dict, full: bool) -> None:
    """One row of the llmzip / peer table: ppl ratio, and time and RSS ratios where comparable."""
    # a run with a note on its conditions (e.g. beside other work) compares perplexity only
    full = full and _run(a)["id"] == _run(p)["id"] and not _run(a).get("note")
    t = f"{a['quant_s'] / p['quant_s']:.2f}" if full else "-"
    m = f"{a['peak_rss_mib'] / p['peak_rss_mib']:.2f}" if full else "-"
    lines.append(f"| {setting} | {a['tool']} vs {p['tool']} | {a['ppl'] / p['ppl']:.4f} | {t} | {m} |")


def render(result: dict, results: Path) -> None:
    rows = result["rows"]
    c = result["calibration"]
    lines = [f"# {result['benchmark']}", "",
             f"Calibration: {c['samples']} x {c['seq_len']} tokens of '{c['source']}' (seed {c['seed']}, digest "
             f"{c['digest']}), the same ids for every calibrated tool"
             f"{'' if c['all_calibrated_rows_used_it'] else ' (NOT confirmed for every row: see the JSON)'}. "
             f"GPTQ: {result['gptq']}.",
             f"Perplexity: {result['ppl_protocol']}. Platform of the latest run: {result['machine']} (each "
             "run's CPU, where it was recorded, in the list below).",
             "quant s = wall time of the whole quantize process (start-up + load + calibrate + quantize + "
             "save), the rows of one run back to back; peak RSS of that process (its own VmHWM, bench/procmem.py). "
             "Runs (column `run`):", ""]
    first = result["command"].split(" ; ")[0]
    runs = list({_run(r, first)["id"]: _run(r, first) for r in rows}.values())
    index = {r["id"]: i for i, r in enumerate(runs, 1)}
    lines += [f"{index[r['id']]}. `{r['command']}`" + ("" if r["id"] == "earlier" else f" (started {r['id']})")
              + (f"; machine: {r['machine']}" if r.get("machine") else "")
              + ("" if r.get("rss") == "VmHWM" else "; its peak RSS is the process's ru_maxrss, which also "
                 "counts the bench driver's own peak before the fork, so it may read high")
              + (f"; {r['note']}" if r.get("note") else "")
              for r in runs]
    lines += ["", "mean KLD (nats) and top-1 agreement: `llmzip eval kld` against bf16 on the same windows, for "
              "the rows whose run measured them (`-`: not measured).", "",
              "| setting | tool | ppl | ppl / bf16 | mean KLD | top-1 | bits/weight | quant s | peak RSS MiB | run |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    bits_notes = list(dict.fromkeys(r["bits_note"] for r in rows if r.get("bits_note")))
    for r in rows:
        bpw = _num(r["bits_per_weight"], ".3f") + ("*" * (bits_notes.index(r["bits_note"]) + 1)
                                                   if r.get("bits_note") else "")
        tail = (f"{bpw} | {_num(r['quant_s'], '')} | {_num(r['peak_rss_mib'], '')} | {index[_run(r)['id']]} |")
        if r["skipped"]:
            notes.append(f"{r['setting']}, {r['tool']}: `{r['skipped']}`")
            lines.append(f"| {r['setting']} | {r['tool']} | skipped [{len(notes)}] | - | - | - | {tail}")
            continue
        lines.append(f"| {r['setting']} | {r['tool']} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | "
                     f"{_num(r.get('mean_kld'), '.4f')} | {_num(r.get('top1_agreement'), '.4f')} | {tail}")
    if bits_notes:
        lines.append("")
        for i, note in enumerate(bits_notes, 1):
            who = sorted({r["tool"] for r in rows if r.get("bits_note") == note})
            stars = "\\*" * i
            lines.append(f"{stars} {', '.join(who)}: bits/weight is {note}.")
        lines.append("Rows without a star (llmzip, llm-compressor) are measured from the saved checkpoint: "
                     "a 16-bit scale per group, and in an asym setting also a zero point per group at the "
                     "weight's width; symmetric otherwise.")
    if notes:
        lines += ["", "Skipped rows, with the tool's own error:", ""]
        lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    lines += ["", "llmzip / peer, same setting (below 1 favours llmzip; HQQ needs no calibration, so only ppl; "
              "time and RSS are compared only between rows of the same run, and not for a run noted as "
              "measured beside other work):", "",
              "| setting | llmzip vs peer | ppl ratio | quant time ratio | peak RSS ratio |",
              "|---|---|---:|---:|---:|"]
    for s in dict.fromkeys(r["setting"] for r in rows[1:]):
        for ours, peer, full in PAIRS:
            mine = [r for r in rows if r["setting"] == s and r["tool_key"] == ours and r.get("ppl")]
            p = next((r for r in rows if r["setting"] == s and r["tool_key"] == peer and r.get("ppl")), None)
            for a in mine if p else ():
                pair_line(lines, s, a, p, full)
    if lines[-1].startswith("|---"):
        lines.append("| (no llmzip row with a peer row of the same setting in this run) | | | | |")
    lines += summary(rows)
    text = "\n".join(lines) + "\n"
    (results / f"{NAME}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
