"""bench/calibrated_peers.py's bookkeeping: which rows --merge treats as the same row, and that
rows differing only in --iters both reach the tables (no model is run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(BENCH))  # its own imports: machine, procmem
    try:
        spec = importlib.util.spec_from_file_location("bench_calibrated_peers", BENCH / "calibrated_peers.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _row(setting, key, iters, ppl, tool):
    return {"setting": setting, "tool": tool, "tool_key": key, "iters": iters, "ppl": ppl, "ppl_ratio": ppl / 20.0,
            "quant_s": 100.0, "peak_rss_mib": 1000, "bits_per_weight": 4.25, "bits_note": None, "skipped": None,
            "run": {"id": "r", "command": "c"}}


def test_iters_separate_signround_rows_only(peers):
    sr40, sr50 = (_row("W4 g64", "llmzip-signround-model", n, 22.0, "x") for n in (40, 50))
    ar_a, ar_b = (_row("W4 g64", "autoround", n, 22.0, "x") for n in (50, None))
    assert peers.row_id(sr40) != peers.row_id(sr50)
    assert peers.row_id(ar_a) == peers.row_id(ar_b)  # AutoRound runs its own recipe whatever --iters says
    assert peers.row_tag("llmzip-signround-model", "W2 g64 asym", 40) == "llmzip-signround-model-W2_g64_asym-40iters"
    assert peers.row_tag("autoround", "W2 g64 asym", 40) == "autoround-W2_g64_asym"
    assert peers.SETTINGS["W2 g64 asym"] == (2, 64, True) and peers.SETTINGS["W2 g64"] == (2, 64, False)


def test_both_iters_rows_are_compared_with_the_peer(peers, tmp_path):
    rows = [_row("bf16", "bf16", None, 20.0, "-"),
            _row("W4 g64", "llmzip-signround-model", 40, 22.3, "llmzip 0.1 SR (40 iters)"),
            _row("W4 g64", "llmzip-signround-model", 50, 22.0, "llmzip 0.1 SR (50 iters)"),
            _row("W4 g64", "autoround", 50, 22.4, "AutoRound light")]
    result = {"benchmark": "b", "rows": rows, "command": "c", "gptq": "g", "ppl_protocol": "p", "machine": "m",
              "calibration": {"samples": 1, "seq_len": 1, "source": "lee", "seed": 0, "digest": "d",
                              "all_calibrated_rows_used_it": True}}
    peers.render(result, tmp_path)
    text = (tmp_path / "calibrated_peers.md").read_text()
    assert "| W4 g64 | llmzip 0.1 SR (40 iters) vs AutoRound light | 0.9955 |" in text  # 22.3 / 22.4
    assert "| W4 g64 | llmzip 0.1 SR (50 iters) vs AutoRound light | 0.9821 |" in text  # 22.0 / 22.4
    assert "| W4 g64 | 1.1000 (SR (50 iters)) |" in text  # the best llmzip row of the setting
