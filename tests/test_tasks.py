"""Built-in offline tasks (eval/tasks.py): scorers on hand-made examples, data, and real runs."""

import json
import subprocess
import sys

import pytest
import torch

from llmzip.eval import tasks
from llmzip.kernels.cpu_dense import fp32_products
from llmzip.eval.tasks import (extract_gsm8k_answer, gpqa_items, gpqa_prompt, gsm8k_items, mc_prediction,
                               normalize_number, stderr, strip_calculator, wiki_cloze_items)

GPQA_PER_POSITION_MIN = 30  # GPQA questions (of 198) whose answer sits at each of the 4 positions after shuffling
CLOZE_WORD_MIN_LEN, CLOZE_CONTEXT_MAX_CHARS = 4, 1000  # wiki_cloze item rules: target word, context length
# SmolLM2 wiki_cloze accuracy on 60 items; measured bf16 0.333, RTN W2 0.0
CLOZE_BF16_ACC_MIN = 0.25  # bf16 accuracy
CLOZE_W2_DROP_MIN = 0.15  # accuracy lost by RTN W2 g64
CONTINUATION_LOGP_TOL = 1e-3  # continuation log-probability vs a full forward (bf16)
BATCHED_LOGP_DIFF_MAX = 0.25  # log-probability, right-padded batch of 5 vs one request at a time (bf16); measured 0.105
BATCHED_GREEDY_SAME_MIN = 11  # of 12 requests, same is-greedy flag batched and alone


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("so the total is $1,234.", "1234"),
    ("The answer is 3.50 dollars", "3.5"),
    ("It costs 18.0", "18"),
    ("x = -4, so -4 apples", "-4"),
    ("no digits here", None),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_number_normalisation_and_calculator_stripping():
    assert normalize_number(" $2,000. ") == "2000" and normalize_number("abc") == "abc"
    assert strip_calculator("16 - 3 = <<16-3=13>>13 eggs") == "16 - 3 = 13 eggs"


def test_mc_prediction_and_stderr():
    assert mc_prediction([-3.0, -1.0, -1.0, -2.0]) == 1  # first of tied maxima
    assert stderr(0.5, 101) == pytest.approx(0.05)


def test_gpqa_items_are_complete_and_deterministic():
    items = gpqa_items()
    assert len(items) == 198 and gpqa_items() == items
    assert all(len(x["choices"]) == 4 and 0 <= x["answer"] < 4 for x in items)
    # Shuffled per question: every position holds the correct answer for some questions.
    counts = [sum(x["answer"] == i for x in items) for i in range(4)]
    assert min(counts) > GPQA_PER_POSITION_MIN
    assert gpqa_prompt(items[0]).endswith("\n(D) " + items[0]["choices"][3] + "\nAnswer:")


def test_gsm8k_and_cloze_data():
    items = gsm8k_items()
    assert len(items) == 1319 and extract_gsm8k_answer(items[0]["answer"]) == "18"
    cloze = wiki_cloze_items()
    assert len(cloze) == 500 and wiki_cloze_items() == cloze
    assert all(w.isalpha() and len(w) >= CLOZE_WORD_MIN_LEN and len(c) <= CLOZE_CONTEXT_MAX_CHARS
               and not c.endswith(" ") for c, w in cloze)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from llmzip.models import load_pretrained

    return load_pretrained(str(smollm2_dir))


def test_cloze_separates_a_real_model_from_a_weak_one(smol, smollm2_dir):
    import llmzip
    from llmzip.config import QuantConfig, WeightScheme

    model, tok = smol
    good = tasks.wiki_cloze(model, tok, limit=60, progress=False)
    w2, _ = llmzip.quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(2, 64)), progress=False)
    bad = tasks.wiki_cloze(w2, tok, limit=60, progress=False)
    assert good.n == 60 and good.value > CLOZE_BF16_ACC_MIN
    assert bad.value < good.value - CLOZE_W2_DROP_MIN


def test_gsm8k_scores_a_completion_that_states_the_gold_answer(smol, monkeypatch):
    model, tok = smol
    items = gsm8k_items()[tasks.GSM8K_SHOTS:][:3]

    def fake_generate(ids, **kw):  # answers items 0 and 1 correctly, item 2 wrongly
        i = fake_generate.calls
        fake_generate.calls += 1
        gold = extract_gsm8k_answer(items[i]["answer"])
        text = f" Work... #### {gold if i < 2 else int(gold) + 1}\n\nQuestion: next"
        return torch.cat([ids, torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])], 1)

    fake_generate.calls = 0
    monkeypatch.setattr(model, "generate", fake_generate)
    r = tasks.gsm8k(model, tok, limit=3, progress=False)
    assert r.n == 3 and r.value == pytest.approx(2 / 3)


def test_continuation_scores_match_a_full_forward(smol):
    model, tok = smol
    ctx, cont = tok("The capital of France is")["input_ids"], tok(" Paris")["input_ids"]
    logp, greedy = tasks.continuation_scores(model, ctx, cont)
    # the same products as the scorer (bf16 in fp32 on CPUs without native bf16 matmuls)
    with torch.no_grad(), fp32_products(model.device):
        full = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    expected = sum(full[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert logp == pytest.approx(expected, abs=CONTINUATION_LOGP_TOL)
    assert greedy == all(full[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))


def test_batched_requests_score_like_single_ones(smol):
    """Right-padded batches of uneven length give each request its unbatched score."""
    model, tok = smol
    items = tasks.wiki_cloze_items()[:12]
    requests = [(tok(c, add_special_tokens=False)["input_ids"], tok(" " + w, add_special_tokens=False)["input_ids"])
                for c, w in items]
    assert len({len(a) + len(b) for a, b in requests}) > 1  # padding really happens
    single = tasks.score_requests(model, requests, batch_size=1)
    batched = tasks.score_requests(model, requests, batch_size=5)
    assert max(abs(a[0] - b[0]) for a, b in zip(single, batched)) < BATCHED_LOGP_DIFF_MAX
    assert sum(a[1] == b[1] for a, b in zip(single, batched)) >= BATCHED_GREEDY_SAME_MIN


def test_gpqa_runs_on_smollm2(smol):
    model, tok = smol
    r = tasks.gpqa_diamond(model, tok, limit=8, progress=False)
    assert r.n == 8 and r.metric == "acc" and (r.value * 8) == int(r.value * 8)


def test_cli_eval_tasks(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "llmzip", "eval", "tasks", str(smollm2_dir), "--tasks", "wiki_cloze",
                          "--limit", "10", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (r,) = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert r["task"] == "wiki_cloze" and r["n"] == 10
    bad = subprocess.run([sys.executable, "-m", "llmzip", "eval", "tasks", str(smollm2_dir), "--tasks",
                          "no_such_task_xyz"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task(s) no_such_task_xyz" in bad.stderr
