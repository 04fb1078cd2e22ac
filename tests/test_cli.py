"""The command line, end to end on the demo model, in a temporary directory."""

import pytest
from helpers import last_json, run

BPW_TOL = 0.01  # reported bits per weight vs the W4 g64 arithmetic (4 + 16 / 64)
PPL_MIN, PPL_MAX = 10, 60  # W4 g64 SmolLM2 ppl, 2 windows of 512: bf16 is ~22 on this text; random weights give ~49152
SIZE_RATIO_MIN, SIZE_RATIO_MAX = 0.35, 0.5  # W4 checkpoint size / bf16 size: embeddings stay bf16


@pytest.mark.slow
def test_quantize_eval_info_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "w4"
    q = run("quantize", "smollm2-135m", "--bits", "4", "--group-size", "64", "-o", str(out), "--json")
    assert q.returncode == 0, q.stderr
    summary = last_json(q.stdout)
    assert summary["quantized_layers"] == 210 and summary["ignored"] == ["lm_head"]  # 30 layers x 7
    # 4-bit codes + one bf16 scale per 64 weights = 4.25 bits
    assert summary["bits_per_weight"] == pytest.approx(4.25, abs=BPW_TOL)
    assert (out / "llmzip.json").is_file() and (out / "tokenizer.json").is_file()

    e = run("eval", "ppl", str(out), "--ctx", "512", "--max-windows", "2", "--json")
    assert e.returncode == 0, e.stderr
    res = last_json(e.stdout)
    assert res["windows"] == 2 and res["tokens"] == 2 * 511 and res["ctx"] == 512
    assert PPL_MIN < res["ppl"] < PPL_MAX

    i = run("info", str(out), "--json")
    assert i.returncode == 0, i.stderr
    info = last_json(i.stdout)
    assert SIZE_RATIO_MIN < info["ratio_to_bf16"] < SIZE_RATIO_MAX
    assert info["bits_per_weight"] == pytest.approx(summary["bits_per_weight"])


def test_bad_bits_is_one_line_error(tmp_path):
    r = run("quantize", "smollm2-135m", "--bits", "9", "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["llmzip: error: bits=9 is not supported: use an integer from 2 to 8"]
    assert list(tmp_path.iterdir()) == []


def test_missing_model_dir(tmp_path):
    r = run("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_group_that_does_not_divide_names_layer(smollm2_dir, tmp_path):
    r = run("quantize", "smollm2-135m", "--group-size", "100", "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "layer 'model.layers.0.self_attn.q_proj': group size 100 does not divide its 576" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("quantize", "smollm2-135m", "-o", str(blocker / "out"))
    assert r.returncode == 2 and "is a file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_missing_eval_data(tmp_path):
    r = run("eval", "ppl", "smollm2-135m", "--data", str(tmp_path / "none.txt"))
    assert r.returncode == 2 and "text source" in r.stderr


def test_usage_error_exit_code():
    assert run("quantize").returncode == 2
    assert run("--help").returncode == 0
