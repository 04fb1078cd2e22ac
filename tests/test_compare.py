"""`llmzip compare`: regression report and CI verdict on SmolLM2-135M."""

import json
import subprocess
import sys

import pytest

from llmzip.eval.compare import Thresholds, parse_fraction

MAX_KLD = 0.05  # the --max-kld gate of _compare: W8 passes it, W3 exceeds it
MAX_PPL_RATIO = 1.02  # the --max-ppl-increase 2% gate of _compare, as a ppl ratio
BPW_TOL = 0.01  # reported bits per weight vs the W8 g64 arithmetic (8 + 16 / 64)
PNG_MIN_BYTES = 1000  # a report plot holds a drawing, not an empty canvas


@pytest.fixture(scope="module")
def checkpoints(smollm2_dir, tmp_path_factory):
    """RTN W8 and W3 (g64) checkpoints of SmolLM2."""
    import llmzip
    from llmzip.config import QuantConfig, WeightScheme

    d = tmp_path_factory.mktemp("ckpts")
    for bits in (8, 3):
        llmzip.quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(bits, 64)), output_dir=d / f"w{bits}",
                        progress=False)
    return d


def _compare(base, *models, report, extra=()):
    cmd = [sys.executable, "-m", "llmzip", "compare", str(base), *map(str, models), "--ctx", "256",
           "--max-windows", "2", "--max-ppl-increase", "2%", "--max-kld", str(MAX_KLD), "--report", str(report),
           "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_thresholds_and_fractions():
    assert parse_fraction("2%") == 0.02 and parse_fraction("0.02") == 0.02
    t = Thresholds(max_ppl_increase=0.02, max_kld=0.05)
    assert t.failures({"ppl_ratio": 1.019, "mean_kld": 0.049}) == []
    assert len(t.failures({"ppl_ratio": 1.021, "mean_kld": 0.051})) == 2


def test_compare_passes_w8_and_fails_w3(smollm2_dir, checkpoints, tmp_path):
    ok = _compare(smollm2_dir, checkpoints / "w8", report=tmp_path / "r8")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    report = json.loads((tmp_path / "r8" / "report.json").read_text())
    assert summary["passed"] is True and report["passed"] is True
    (row,) = report["rows"]
    # The printed numbers are the report's numbers.
    assert summary["rows"][0]["mean_kld"] == row["mean_kld"] and summary["rows"][0]["ppl"] == row["ppl"]
    assert f"{row['mean_kld']:.5f}" in (tmp_path / "r8" / "report.md").read_text()
    assert row["bits_per_weight"] == pytest.approx(8.25, abs=BPW_TOL) and len(row["layer_rel_err"]) == 210
    for png in ("quality_vs_bits.png", "layer_error.png", "window_ppl.png"):
        assert (tmp_path / "r8" / png).stat().st_size > PNG_MIN_BYTES

    bad = _compare(smollm2_dir, checkpoints / "w8", checkpoints / "w3", report=tmp_path / "r8")
    assert bad.returncode == 1, bad.stderr
    assert "w3" in bad.stderr and "quality regression" in bad.stderr
    assert "cached result" in bad.stderr  # W8 was evaluated by the first run
    rows = json.loads((tmp_path / "r8" / "report.json").read_text())["rows"]
    assert [r["failures"] == [] for r in rows] == [True, False]
    assert rows[1]["mean_kld"] > MAX_KLD and rows[1]["ppl_ratio"] > MAX_PPL_RATIO


def test_bad_threshold_is_a_usage_error(smollm2_dir, tmp_path):
    out = _compare(smollm2_dir, smollm2_dir, report=tmp_path / "r", extra=["--max-ppl-increase", "lots"])
    assert out.returncode == 2 and "--max-ppl-increase" in out.stderr


def test_task_drop_is_measured_in_points_for_higher_is_better_metrics():
    from llmzip.eval.compare import _with_base

    base = [{"task": "wiki_cloze", "metric": "acc", "value": 0.40},
            {"task": "lambada", "metric": "perplexity", "value": 10.0}]
    rows = _with_base([{"task": "wiki_cloze", "metric": "acc", "value": 0.385, "higher_is_better": True},
                       {"task": "lambada", "metric": "perplexity", "value": 12.0, "higher_is_better": False}], base)
    assert rows[0]["drop_points"] == pytest.approx(1.5) and rows[0]["base_value"] == 0.40
    assert rows[1]["drop_points"] is None
    row = {"ppl_ratio": 1.0, "mean_kld": 0.0, "tasks": rows}
    assert Thresholds(max_acc_drop=1.0).failures(row) == ["wiki_cloze acc -1.50 points > 1"]
    assert Thresholds(max_acc_drop=2.0).failures(row) == []


def test_compare_with_tasks_reports_and_gates(smollm2_dir, checkpoints, tmp_path):
    """Tasks run on base and model, land in report.json/md, and --max-acc-drop decides the
    exit code (a negative limit fails even an unchanged score)."""
    cmd = [sys.executable, "-m", "llmzip", "compare", str(smollm2_dir), str(checkpoints / "w8"), "--ctx", "256",
           "--max-windows", "1", "--tasks", "wiki_cloze", "--limit", "8", "--batch-size", "4", "--report",
           str(tmp_path / "r"), "--json"]
    ok = subprocess.run(cmd + ["--max-acc-drop", "100"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    (task,) = report["rows"][0]["tasks"]
    (base,) = report["tasks"]["base"]
    assert task["task"] == "wiki_cloze" and task["n"] == 8 and base["n"] == 8
    assert task["drop_points"] == pytest.approx(100 * (base["value"] - task["value"]))
    assert "| wiki_cloze | acc |" in (tmp_path / "r" / "report.md").read_text()
    bad = subprocess.run(cmd + ["--max-acc-drop", "-100"], capture_output=True, text=True)
    assert bad.returncode == 1 and "wiki_cloze acc" in bad.stderr
    assert "cached wiki_cloze result" in bad.stderr  # both task results were reused
