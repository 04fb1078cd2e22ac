"""Peer row: HQQ (half-quadratic quantization, calibration-free), written back dequantized.

Runs inside HQQ's own virtualenv (see bench/setup_peers.sh), on CPU:
    python peers/hqq_quant.py MODEL_DIR OUT_DIR --bits 4 --group-size 64   (-1 = per-channel)
Every decoder Linear (not lm_head) goes through HQQLinear with HQQ's BaseQuantizeConfig
(nbits, group_size, axis=1; HQQ's own defaults otherwise: its optimizer on, asymmetric with a
float zero point, rounded at 4 bits). Its dequantized weight then replaces the bf16 weight and the
model is saved as a plain bf16 HF checkpoint (+ tokenizer), so the same evaluator scores it.
bits_per_weight is nominal, from the group size: nbits + a 16-bit scale and a 16-bit zero
per group (HQQ's meta-data in bf16), not measured from a saved HQQ checkpoint.
Prints one JSON line: {"seconds": quantize + dequantize + save, excluding model load, "version",
"bits_per_weight", "layers"}.
"""

import argparse
import json
import time
from importlib.metadata import version

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("out")
p.add_argument("--bits", type=int, default=4)
p.add_argument("--group-size", type=int, default=64)
a = p.parse_args()

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(a.model)
t0 = time.perf_counter()
bits = weights = layers = 0
with torch.no_grad():
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        group = mod.in_features if a.group_size == -1 else a.group_size
        cfg = BaseQuantizeConfig(nbits=a.bits, group_size=None if a.group_size == -1 else a.group_size, axis=1)
        q = HQQLinear(mod, cfg, compute_dtype=torch.bfloat16, device="cpu", del_orig=False)
        mod.weight.copy_(q.dequantize().reshape(mod.weight.shape))
        n = mod.weight.numel()
        bits += n * a.bits + (n // group) * 32
        weights += n
        layers += 1
        del q
model.save_pretrained(a.out)
tok.save_pretrained(a.out)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "version": version("hqq"),
                  "bits_per_weight": round(bits / weights, 4), "bits_per_weight_nominal": True,
                  "layers": layers}))
