"""lm-eval adapter: lm-eval tasks on the model object llmzip loads give what lm-eval's
own `hf` model gives, on a local task (no network)."""

import json
import subprocess
import sys

import lm_eval
import pytest
import torch
from helpers import tiny_llama
from lm_eval.tasks import TaskManager
from transformers import AutoTokenizer

from llmzip.eval.lmeval import run_lm_eval
from llmzip.models import load_for_eval

FACTS = [
    ("The capital of France is", ["Paris", "Rome", "Berlin", "Madrid"], 0),
    ("Water freezes at", ["100 degrees", "0 degrees", "50 degrees", "-40 degrees"], 1),
    ("The largest planet is", ["Mars", "Venus", "Jupiter", "Mercury"], 2),
    ("A week has", ["five days", "six days", "eight days", "seven days"], 3),
    ("The opposite of hot is", ["cold", "warm", "red", "loud"], 0),
    ("Bees make", ["milk", "honey", "silk", "glass"], 1),
    ("The sun rises in the", ["north", "south", "east", "west"], 2),
    ("Two plus two is", ["three", "five", "six", "four"], 3),
    ("Fish live in", ["water", "sand", "trees", "clouds"], 0),
    ("The color of grass is", ["blue", "green", "purple", "orange"], 1),
    ("Ice is frozen", ["air", "fire", "water", "stone"], 2),
    ("A triangle has", ["five sides", "two sides", "four sides", "three sides"], 3),
]
TASK = "llmzip_tiny_mc"
LOGLIK_TOL = 1e-4  # per-choice log-likelihoods, llmzip adapter vs lm-eval's hf model (fp32)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice lm-eval task over a local JSONL file."""
    d = tmp_path_factory.mktemp("lmeval")
    data = d / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in FACTS))
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: answer\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return d


@pytest.fixture(scope="module")
def models(smollm2_dir, tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer (fp32), and its RTN W4 g32 checkpoint."""
    import llmzip
    from llmzip.config import QuantConfig, WeightScheme

    d = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(dtype=torch.float32, vocab_size=49152, hidden_size=64, intermediate_size=128)
    model.save_pretrained(d / "base")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(d / "base")
    llmzip.quantize(str(d / "base"), QuantConfig(weights=WeightScheme(4, 32)), output_dir=d / "w4", progress=False)
    return d


def _by_doc(samples: list[dict]) -> list:
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("which", ["base", "w4"])
def test_adapter_matches_lm_eval_hf(models, task_dir, which):
    """Same accuracy and the same per-choice log-likelihoods (1e-4) as lm-eval's `hf`
    model loading the directory itself; for w4 transformers reads our compressed-tensors
    checkpoint while llmzip runs its QuantLinear modules."""
    path = str(models / which)
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": path, "dtype": "float32",
                                                              "device": "cpu"},
                                     tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                                     batch_size=1, log_samples=True)
    model, tok = load_for_eval(path, torch.float32)
    if which == "w4":
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    results, samples = run_lm_eval(model, tok, [TASK], include_path=str(task_dir), log_samples=True)
    mine = {r.metric: r for r in results}
    assert set(mine) == {"acc", "acc_norm"} and mine["acc"].n == len(FACTS)
    for metric in ("acc", "acc_norm"):
        assert mine[metric].value == theirs["results"][TASK][f"{metric},none"]
        assert mine[metric].stderr == pytest.approx(theirs["results"][TASK][f"{metric}_stderr,none"])
    a, b = _by_doc(samples[TASK]), _by_doc(theirs["samples"][TASK])
    assert len(a) == len(FACTS) and all(len(x) == 4 for x in a)
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) < LOGLIK_TOL


def test_cli_runs_lm_eval_tasks_next_to_built_in_ones(models, task_dir):
    out = subprocess.run([sys.executable, "-m", "llmzip", "eval", "tasks", str(models / "base"), "--tasks",
                          f"wiki_cloze,{TASK}", "--limit", "4", "--include-path", str(task_dir), "--batch-size", "2",
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert [(r["task"], r["metric"], r["n"]) for r in results] == [
        ("wiki_cloze", "acc", 4), (TASK, "acc", 4), (TASK, "acc_norm", 4)]
    unknown = subprocess.run([sys.executable, "-m", "llmzip", "eval", "tasks", str(models / "base"), "--tasks",
                              "no_such_task_xyz"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown task(s) no_such_task_xyz" in unknown.stderr
