"""--resume: a GPTQ or SignRound run killed mid-way continues and gives a bit-identical checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import llmzip
from llmzip import QuantConfig, WeightScheme
from llmzip.api import work_dir
from llmzip.calibration import CalibConfig
from llmzip.config import SignRoundSettings, TuneSettings

LAYERS = 8


@pytest.fixture(scope="module")
def small_model_dir(smollm2_dir, tmp_path_factory):
    """A random 8-layer Llama with SmolLM2's tokenizer (so the CLI can calibrate it)."""
    d = tmp_path_factory.mktemp("small")
    cfg = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(d)
    return d


METHODS = {  # name: (method, QuantConfig keywords, the same settings as CLI options)
    "gptq": ("gptq", {}, []),
    # target "model" carries the float stream, which a resume must restore too
    "signround": ("signround", {"signround": SignRoundSettings(iters=3, batch=2, target="model")},
                  ["--iters", "3", "--signround-batch", "2", "--signround-target", "model"]),
    # the end-to-end scale tuning after the last layer fits to the restored float stream's end
    "gptq-tune": ("gptq", {"tune": TuneSettings(epochs=1)}, ["--tune-epochs", "1"]),
}


def _cmd(model_dir, out, *extra, method="gptq"):
    return [sys.executable, "-m", "llmzip", "quantize", str(model_dir), "--method", method, "--bits", "4",
            "--group-size", "64", "--samples", "16", "--seq-len", "128", "-o", str(out), *extra]


def _tensors(out):
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", list(METHODS))
def test_killed_run_resumes_bit_identical(small_model_dir, tmp_path, name):
    method, settings, options = METHODS[name]
    full = tmp_path / "full"
    llmzip.quantize(str(small_model_dir), QuantConfig(method=method, weights=WeightScheme(4, 64), **settings),
                    output_dir=full, calib=CalibConfig(samples=16, seq_len=128), progress=False)
    assert not work_dir(full).exists()  # progress is removed once the checkpoint is complete

    out = tmp_path / "resumed"
    progress = work_dir(out) / "progress.json"
    proc = subprocess.Popen(_cmd(small_model_dir, out, *options, method=method), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["done"] >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = json.loads(progress.read_text())["done"]
    assert 2 <= done < LAYERS and not out.exists()  # no checkpoint that looks complete

    r = subprocess.run(_cmd(small_model_dir, out, *options, "--resume", method=method), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resume: {done} of {LAYERS} layers restored" in r.stderr
    a, b = _tensors(full), _tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta_a = json.loads((full / "llmzip.json").read_text())
    meta_b = json.loads((out / "llmzip.json").read_text())
    assert meta_a["layers"] == meta_b["layers"] and len(meta_b["blocks"]) == LAYERS
    kl = [[e["kl"] for e in m["tune"]["per_epoch"]] if m["tune"] else None for m in (meta_a, meta_b)]
    assert kl[0] == kl[1] and (kl[1] is not None) == (name == "gptq-tune")


def test_resume_with_other_settings_starts_over(small_model_dir, tmp_path):
    out = tmp_path / "o"
    wd = work_dir(out)
    wd.mkdir(parents=True)
    (wd / "progress.json").write_text(json.dumps({"fingerprint": {"other": 1}, "done": 3}))
    r = subprocess.run(_cmd(small_model_dir, out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "belongs to a run with other settings" in r.stderr and "layers restored" not in r.stderr
