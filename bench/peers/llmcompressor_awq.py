"""Peer row: llm-compressor's AWQ (AWQModifier, then QuantizationModifier) on the driver's ids.

Runs inside llm-compressor's own virtualenv (see bench/setup_peers.sh), model in bf16 on CPU:
    python peers/llmcompressor_awq.py MODEL_DIR OUT_DIR --calib IDS.npy --bits 4 --group-size 64
AWQ settings are the tool's defaults (mappings inferred from the model, duo scaling, 20-point
grid); symmetric int weights, lm_head kept. Calibration data as in llmcompressor_gptq.py.
llm-compressor 0.14 pins its cached activations in page-locked memory for faster host-to-GPU
copies, and on a machine without an accelerator the pinning itself raises; this script turns the
pinning off (a no-op without a GPU, where no copy happens) and changes nothing else.
Prints one JSON line: {"seconds": quantize + save, excluding model load, "version", "calibration"}.
"""

import json
import time
from importlib.metadata import version

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

import calib_ids

if not torch.cuda.is_available():
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)

p = calib_ids.arguments()
a = p.parse_args()

ids, _ = calib_ids.load(a.calib)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(a.model)
weights = QuantizationArgs(
    num_bits=a.bits, type="int", symmetric=not a.asym,
    strategy="channel" if a.group_size == -1 else "group",
    group_size=None if a.group_size == -1 else a.group_size,
)
recipe = [
    AWQModifier(),
    QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                         ignore=["lm_head"]),
]
rec = calib_ids.Recorder(model)
t0 = time.perf_counter()
oneshot(model=model, recipe=recipe, dataset=calib_ids.dataset(ids), num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
seen = rec.report(ids)
model.save_pretrained(a.out, save_compressed=True)
tok.save_pretrained(a.out)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "version": version("llmcompressor"),
                  "calibration": seen}))
