"""Peer rows for bench/kv_cache.py: perplexity through transformers' own QuantizedCache.

Runs inside the hqq virtualenv (transformers + hqq + optimum-quanto, bench/setup_peers.sh):
    python peers/hf_quantized_cache.py MODEL_DIR WINDOWS.npy --backend quanto|hqq|fp8 [--nbits 4
        --residual 128 --group 32 --axis 0] --chunk 64
WINDOWS.npy: int64 [windows, ctx] token ids written by the driver (the same windows llmzip scores).
Protocol as llmzip's `eval ppl --kv-cache`: each window is fed `--chunk` tokens at a time through a
fresh cache; every position but the window's first is scored. Model in bf16 on CPU.
Prints one JSON line: {"nll_sum", "tokens", "ppl", "seconds", "versions"}.
"""

import argparse
import json
import math
import time
from importlib.metadata import version

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, QuantizedCache

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("windows")
p.add_argument("--backend", required=True, choices=["quanto", "hqq", "fp8"])
p.add_argument("--nbits", type=int, default=4)
p.add_argument("--residual", type=int, default=128)
p.add_argument("--group", type=int, default=32)
p.add_argument("--chunk", type=int, default=64)
p.add_argument("--axis", type=int, default=0, help="grouping axis of keys and values (HQQ: 0 or 1; quanto: 0 or -1)")
a = p.parse_args()

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).eval()
windows = torch.from_numpy(np.load(a.windows))
kw = {} if a.backend == "fp8" else {"nbits": a.nbits, "residual_length": a.residual, "q_group_size": a.group,
                                    "axis_key": a.axis, "axis_value": a.axis}
nll_sum, tokens, t0 = 0.0, 0, time.perf_counter()
with torch.inference_mode():
    for row in windows:
        ids = row[None]
        cache = QuantizedCache(a.backend, model.config, **kw)
        logits = torch.cat([model(ids[:, c:c + a.chunk], past_key_values=cache, use_cache=True).logits[0].float()
                            for c in range(0, ids.shape[1], a.chunk)])
        nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
        nll_sum += nll.item()
        tokens += ids.shape[1] - 1
pkg = {"quanto": "optimum-quanto", "hqq": "hqq", "fp8": "transformers"}[a.backend]
print(json.dumps({"nll_sum": nll_sum, "tokens": tokens, "ppl": math.exp(nll_sum / tokens),
                  "seconds": round(time.perf_counter() - t0, 2),
                  "versions": {"transformers": version("transformers"), pkg: version(pkg)}}))
