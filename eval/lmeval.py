"""lm-evaluation-harness on a loaded llmzip model (the `eval` extra).

The model object llmzip loads (QuantLinear modules, and whatever else llmzip put in
place) is handed to lm-eval's own `HFLM` as a pre-initialised model, so every lm-eval
task runs with lm-eval's prompts, batching and metrics on exactly the network llmzip
serves. lm-eval's hub-backed tasks need the network; local task YAMLs (`--include-path
DIR`) work offline.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

from .results import TaskResult


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=4)
def _manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def lm_eval_task_names(include_path: str | None = None) -> set[str] | None:
    """Every task, group and tag lm-eval knows (plus those under include_path), or None
    when lm-eval is not installed."""
    if not available():
        return None
    return set(_manager(include_path).all_tasks)


def hflm(model, tokenizer, batch_size: int = 1):
    """lm-eval's HFLM around an already loaded model (no reload, no device move)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_lm_eval(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 1,
                include_path: str | None = None, num_fewshot: int | None = None,
                log_samples: bool = False) -> list[TaskResult] | tuple[list[TaskResult], dict]:
    """Run lm-eval tasks on `model`; one TaskResult per (task, metric). `seconds` is the
    wall time of the whole lm-eval run (it evaluates all tasks together). With
    log_samples=True, also returns lm-eval's per-sample records {task: [...]}."""
    from importlib.metadata import version as dist_version

    import lm_eval

    from llmzip.kernels.cpu_dense import fp32_products

    t0 = time.perf_counter()
    with fp32_products(next(model.parameters()).device):  # bf16 products in fp32 on CPUs without native bf16
        out = lm_eval.simple_evaluate(model=hflm(model, tokenizer, batch_size), tasks=list(names), limit=limit,
                                      num_fewshot=num_fewshot, task_manager=_manager(include_path),
                                      log_samples=log_samples)
    seconds = round(time.perf_counter() - t0, 2)
    results = []
    for task, metrics in out["results"].items():
        n = (out.get("n-samples") or {}).get(task, {}).get("effective")
        version = (out.get("versions") or {}).get(task)
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            se = metrics.get(f"{metric}_stderr,{filt}")
            se = float(se) if isinstance(se, (int, float)) else math.nan
            better = (out.get("higher_is_better") or {}).get(task, {}).get(metric, True)
            results.append(TaskResult(task, metric if filt == "none" else f"{metric},{filt}", float(value), se,
                                      n or 0, seconds, f"lm-eval {dist_version('lm_eval')} task {task} (version {version})",
                                      higher_is_better=bool(better)))
    if log_samples:
        return results, out.get("samples", {})
    return results
