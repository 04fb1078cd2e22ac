"""Peer row: AutoRound (SignRound, Intel's auto-round) on the driver's calibration ids, written back dequantized.

Runs inside AutoRound's own virtualenv (see bench/setup_peers.sh), model in bf16 on CPU:
    python peers/autoround_quant.py MODEL_DIR OUT_DIR --calib IDS.npy --bits 4 --group-size 64  (-1 = per-channel)
Recipe: AutoRound's "light" one (its CLI's --recipe light: 50 iterations, lr 5e-3, batch 8), symmetric
int weights (asymmetric with --asym), lm_head kept; everything else its defaults. Calibration: the file's rows, in file order, as
token-id tensors of `batch` rows (its dataset argument takes a list of batches), nsamples = rows in the
file, seqlen = their length; the model's embedding records what it saw (calib_ids.Recorder).
Export: AutoRound's "fake" format (the quantize-dequantized weights, fp32 on CPU), read back in bf16 and
written as a plain bf16 HF checkpoint (no quantization_config, so any loader reads it as a dense model),
so the same evaluator scores it. bits_per_weight is nominal, from the group size: nbits + one 16-bit scale per
group (+ an nbits zero point per group with --asym), the way llmzip counts its own checkpoints.
Prints one JSON line: {"seconds": quantize + save, excluding model load, "version", "recipe",
"bits_per_weight", "bits_per_weight_nominal", "bits_note", "calibration"}.
"""

import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer

import calib_ids

LIGHT = {"iters": 50, "lr": 5e-3, "batch_size": 8}  # auto_round/cli/main.py RECIPES["light"] (seqlen/nsamples ours)

p = calib_ids.arguments()
p.add_argument("--iters", type=int, default=LIGHT["iters"], help="only for a smoke test of this script")
a = p.parse_args()

ids, _ = calib_ids.load(a.calib)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(a.model)
bs = LIGHT["batch_size"]
batches = [torch.from_numpy(ids[i : i + bs]) for i in range(0, len(ids), bs)]
rec = calib_ids.Recorder(model)
t0 = time.perf_counter()
ar = AutoRound(model, tok, scheme="W4A16", bits=a.bits, group_size=a.group_size, sym=not a.asym, dataset=batches,
               nsamples=len(ids), seqlen=ids.shape[1], iters=a.iters, lr=LIGHT["lr"], batch_size=bs,
               device_map="cpu", enable_torch_compile=False, seed=42)
fake = Path(a.out) / "fake"
ar.quantize_and_save(str(fake), format="fake")  # on CPU it computes and writes fp32 (no bf16 amp)
seen = rec.report(ids)
saved = next(c.parent for c in fake.rglob("config.json"))  # it adds a subfolder named after the scheme
dense = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
dense.config.__dict__.pop("quantization_config", None)
dense.save_pretrained(a.out)
tok.save_pretrained(a.out)
shutil.rmtree(fake)
group = a.group_size
weights = scales = 0
for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
        weights += mod.weight.numel()
        scales += mod.weight.numel() // (mod.in_features if group == -1 else group)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "version": version("auto-round"),
                  "recipe": f"light ({a.iters} iters, lr 5e-3, batch 8)",
                  "bits_per_weight": round((weights * a.bits + scales * (16 + a.bits * a.asym)) / weights, 4),
                  "bits_per_weight_nominal": True,
                  "bits_note": ("nominal: nbits + one 16-bit scale and one nbits zero point per group (asymmetric)"
                                if a.asym else "nominal: nbits + one 16-bit scale per group (symmetric)")
                               + ", weights written back dequantized as bf16",
                  "pad_id_in_calib": bool(tok.pad_token_id is not None and (ids == tok.pad_token_id).any()),
                  "calibration": seen}))
