"""Greedy tokens and first-step logprobs of one checkpoint in vLLM (run in the vllmcpu venv).

    python bench/vllm_side.py JOB.json OUT.json

JOB: {"model": dir, "prompts": [[ids...]], "new_tokens": N, "logprobs": K, "kv_cache_dtype": "auto"|"fp8"}.
OUT: {"vllm": version, "greedy": [[ids]], "first_logprobs": [{token id: logprob}]} or {"error": "..."}.
Used by bench/vllm_load.py, one process per checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# The engine in this process, so that an error raised in the model's forward (rather than
# "engine core failed to start") is what gets recorded.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    job = json.load(open(sys.argv[1]))
    out: dict = {}
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        out["vllm"] = vllm.__version__
        llm = LLM(model=job["model"], dtype="bfloat16", max_model_len=512, enforce_eager=True,
                  kv_cache_dtype=job.get("kv_cache_dtype", "auto"), seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], logprobs=job["logprobs"])
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params)
        out["greedy"] = [list(r.outputs[0].token_ids) for r in res]
        out["first_logprobs"] = [{str(k): v.logprob for k, v in r.outputs[0].logprobs[0].items()} for r in res]
    except Exception as e:  # recorded per kind, not raised: one failing kind must not hide the others
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        out["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
