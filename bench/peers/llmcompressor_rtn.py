"""Peer row: llm-compressor's RTN (QuantizationModifier, no calibration data).

Runs inside llm-compressor's own virtualenv (see bench/setup_peers.sh):
    python peers/llmcompressor_rtn.py MODEL_DIR OUT_DIR --bits 4 --group-size 64 [--asym]
Prints one JSON line: {"seconds": ...} (quantize + save, excluding model load).
"""

import argparse
import json
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("out")
p.add_argument("--bits", type=int, default=4)
p.add_argument("--group-size", type=int, default=64)
p.add_argument("--asym", action="store_true")
a = p.parse_args()

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(a.model)
args = QuantizationArgs(
    num_bits=a.bits, type="int", symmetric=not a.asym,
    strategy="channel" if a.group_size == -1 else "group",
    group_size=None if a.group_size == -1 else a.group_size,
)
recipe = QuantizationModifier(
    config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]
)
t0 = time.perf_counter()
oneshot(model=model, recipe=recipe)
model.save_pretrained(a.out, save_compressed=True)
tok.save_pretrained(a.out)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3)}))
