"""Perplexity and greedy tokens of GGUF files through llama-cpp-python (run in its venv).

Input JSON (--job): {"models": {label: gguf path}, "windows": [[ids...], ...],
"prompts": [[ids...], ...], "prompt_texts": [str, ...], "new_tokens": N, "threads": T}.
Per model: NLL of each window's tokens 2..ctx from llama.cpp's logits (the protocol of
llmzip eval ppl: each window evaluated alone from an empty cache), greedy continuations
(argmax of the last logits, fed back one token at a time) of each prompt, and llama.cpp's
own tokenization of each prompt text (to check the GGUF's tokenizer against the ids).
Writes JSON to --out. Used by bench/gguf_llamacpp.py.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def main() -> None:
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    # Weight repacking off (llama.cpp's --no-repack): with it, the Q4_0 files of this bench (llama.cpp's own
    # and llmzip's alike) score perplexity 300-500 instead of 25-35 on an AVX512/AMX Xeon with the
    # llama.cpp that llama-cpp-python 0.3.16 vendors; see bench/results/gguf_llamacpp.md.
    defaults = lib.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_repack

    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    job = json.load(open(args.job))
    ctx = len(job["windows"][0])
    results = {"llama_cpp_python": llama_cpp.__version__, "weight_repacking": False, "models": {}}
    for label, path in job["models"].items():
        llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=512, logits_all=True, n_threads=job["threads"],
                              verbose=False)
        nll, count, t0 = 0.0, 0, time.perf_counter()
        for w in job["windows"]:
            llm.reset()
            llm.eval(w)
            logp = log_softmax(np.asarray(llm.scores[: len(w) - 1]))
            nll -= float(logp[np.arange(len(w) - 1), np.asarray(w[1:])].sum())
            count += len(w) - 1
        seconds = time.perf_counter() - t0
        greedy = []
        for p in job["prompts"]:
            llm.reset()
            llm.eval(p)
            out = []
            for _ in range(job["new_tokens"]):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(tok)
                llm.eval([tok])
            greedy.append(out)
        tokenized = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in job["prompt_texts"]]
        results["models"][label] = {"nll": nll, "tokens": count, "ppl": float(np.exp(nll / count)),
                                    "seconds": round(seconds, 1), "greedy": greedy, "tokenized": tokenized}
        print(label, results["models"][label]["ppl"], flush=True)
        del llm
    json.dump(results, open(args.out, "w"))


if __name__ == "__main__":
    main()
