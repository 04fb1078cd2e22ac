"""llmzip perplexity (wiki, 8 x 2048, the protocol of bench/gguf_llamacpp.py) of W4 g32 symmetric
variants of SmolLM2 (each a GGUF Q4_0 candidate), 32 x 512 calibration tokens of lee.

    .venv/bin/python bench/gguf_variants.py gptq,gptq-ao-signed-refit

Prints one JSON line per variant. Clip-search options (signed grid, refit) are ClipSearch fields."""
import json
import sys
import time
from pathlib import Path

import torch
from llmzip import QuantConfig, WeightScheme, load, quantize
from llmzip.config import GPTQSettings, ClipSearch
from llmzip.calibration import CalibConfig
from llmzip.data import load_text
from llmzip.eval.perplexity import perplexity, tokenize
from llmzip.models import demo_checkpoint
torch.manual_seed(0)
base_dir = demo_checkpoint("smollm2-135m")
variants = {
 "awq+gptq-ao-clip": dict(method="awq+gptq", clip=ClipSearch(), gptq=GPTQSettings(act_order=True, static_groups=True)),
 "gptq-ao-signed-refit": dict(method="gptq", gptq=GPTQSettings(act_order=True, static_groups=True)),
 "gptq-ao-refit2": dict(method="gptq", gptq=GPTQSettings(act_order=True, static_groups=True, scale_refit=2)),
 "gptq-refit2": dict(method="gptq", gptq=GPTQSettings(scale_refit=2)),
 "gptq-unsigned": dict(method="gptq", clip=ClipSearch(signed=False, refit=0)),
 "gptq-signed-norefit": dict(method="gptq", clip=ClipSearch(refit=0)),
 "gptq": dict(method="gptq"),
 "awq+gptq": dict(method="awq+gptq"),
 "gptq-noclip": dict(method="gptq", clip=None),
}
names = sys.argv[1].split(",")
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(base_dir)
ids = tokenize(tok, load_text("wiki"))
for n in names:
    t0 = time.time()
    out = str(Path(__file__).resolve().parent / ".work" / "gguf_variants" / n)
    quantize(str(base_dir), QuantConfig(weights=WeightScheme(4, 32, True), **variants[n]), output_dir=out,
             calib=CalibConfig(samples=32, seq_len=512), progress=False)
    q = time.time() - t0
    m = load(out)
    p = perplexity(m, ids, ctx=2048, max_windows=8, progress=False).ppl
    print(json.dumps({"variant": n, "ppl": p, "quant_s": round(q, 1)}), flush=True)
