"""Peer row: llm-compressor's GPTQ (GPTQModifier) on the driver's calibration ids.

Runs inside llm-compressor's own virtualenv (see bench/setup_peers.sh), model in bf16 on CPU:
    python peers/llmcompressor_gptq.py MODEL_DIR OUT_DIR --calib IDS.npy --bits 4 --group-size 64
GPTQ settings are the tool's defaults except: dampening 0.01, block 128, act-order off
(the same as llmzip's), or --actorder weight (columns in descending Hessian diagonal order with
static groups, no g_idx in the checkpoint: llmzip's --act-order; llm-compressor's own default). Symmetric int weights, lm_head kept. The ids go in as an already
tokenized dataset, in file order (no shuffling), truncated to nothing (rows are seq_len long).
Prints one JSON line: {"seconds": quantize + save, excluding model load, "version", "calibration":
what the model's embedding actually saw, see calib_ids.Recorder}.
"""

import json
import time
from importlib.metadata import version

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

import calib_ids

p = calib_ids.arguments()
p.add_argument("--actorder", choices=["weight"], default=None)
a = p.parse_args()

ids, _ = calib_ids.load(a.calib)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(a.model)
weights = QuantizationArgs(
    num_bits=a.bits, type="int", symmetric=not a.asym,
    strategy="channel" if a.group_size == -1 else "group",
    group_size=None if a.group_size == -1 else a.group_size,
)
recipe = GPTQModifier(
    config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"],
    block_size=128, dampening_frac=0.01, actorder=a.actorder,
)
rec = calib_ids.Recorder(model)
t0 = time.perf_counter()
oneshot(model=model, recipe=recipe, dataset=calib_ids.dataset(ids), num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
seen = rec.report(ids)
model.save_pretrained(a.out, save_compressed=True)
tok.save_pretrained(a.out)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "version": version("llmcompressor"),
                  "calibration": seen}))
