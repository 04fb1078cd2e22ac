"""Peer row: lm-evaluation-harness's own `hf` model on a local task (its own virtualenv).

    python peers/lmeval_hf.py MODEL_DIR TASK --include-path DIR [--limit N] [--batch-size B]
Loads the model with lm-eval's HFLM (bf16, CPU), then times simple_evaluate alone (model
load excluded, as llmzip's task timings exclude it). Prints one JSON line:
{"seconds", "results": {metric: value}, "n", "version"}.
"""

import argparse
import json
import time
from importlib.metadata import version

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("task")
p.add_argument("--include-path", required=True)
p.add_argument("--limit", type=int, default=None)
p.add_argument("--batch-size", type=int, default=1)
a = p.parse_args()

lm = HFLM(pretrained=a.model, dtype="bfloat16", device="cpu", batch_size=a.batch_size)
tm = TaskManager(include_path=a.include_path)
t0 = time.perf_counter()
out = lm_eval.simple_evaluate(model=lm, tasks=[a.task], limit=a.limit, task_manager=tm, log_samples=False)
seconds = time.perf_counter() - t0
res = {k.split(",")[0]: v for k, v in out["results"][a.task].items() if "," in k and isinstance(v, float)}
print(json.dumps({"seconds": round(seconds, 2), "results": res, "n": out["n-samples"][a.task]["effective"],
                  "version": version("lm_eval")}))
