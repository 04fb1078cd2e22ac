"""KL divergence against the base model (eval/kld.py, `llmzip eval kld`)."""

import json
import math
import subprocess
import sys

import torch
from helpers import tiny_llama

from llmzip.eval.kld import kl_divergence, token_kld

FORMULA_TOL = 1e-6  # token_kld vs the closed form, float32
# SmolLM2 W8 / W3 (g64) vs bf16, 2 windows of 512; measured W8 mean KLD 0.0037, top-1 0.969; W3 2.16, top-1 0.317
W8_KLD_MAX = 0.02  # W8 mean KLD
W8_TOP1_MIN = 0.9  # W8 top-1 agreement with the base model
W3_VS_W8_KLD_MIN = 10  # W3 mean KLD / W8 mean KLD
W8_PPL_RATIO_MIN = 0.99  # W8 ppl / base ppl: quantization does not help


def test_token_kld_matches_the_formula():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.5, 0.25]])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    got = token_kld(p.log(), q.log()).item()  # logits = log-probabilities (softmax is shift-invariant)
    assert abs(got - expected) < FORMULA_TOL
    assert token_kld(p.log(), p.log()).item() == 0.0


def test_model_against_itself_is_zero_and_agrees_everywhere():
    model = tiny_llama(dtype=torch.float32)
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    r = kl_divergence(model, model, ids, ctx=64, progress=False)
    assert r.windows == 4 and r.tokens == 4 * 63
    assert r.mean_kld == 0.0 and r.max_kld == 0.0 and r.top1_agreement == 1.0
    assert r.ppl == r.base_ppl and r.ppl_ratio == 1.0


def test_w3_diverges_more_than_w8_on_smollm2(smollm2_dir, wiki_ids):
    import llmzip
    from llmzip.config import QuantConfig, WeightScheme
    from llmzip.models import load_pretrained

    base, _ = load_pretrained(str(smollm2_dir))
    res = {}
    for bits in (8, 3):
        q, _ = llmzip.quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(bits, 64)), progress=False)
        res[bits] = kl_divergence(base, q, wiki_ids, ctx=512, max_windows=2, progress=False)
    # Measured (2 windows of 512): W8 mean KLD 0.0037, top-1 0.969; W3 2.16, top-1 0.317.
    assert 0 < res[8].mean_kld < W8_KLD_MAX and res[8].top1_agreement > W8_TOP1_MIN
    assert res[3].mean_kld > W3_VS_W8_KLD_MIN * res[8].mean_kld
    assert res[3].top1_agreement < res[8].top1_agreement
    assert res[3].ppl_ratio > res[8].ppl_ratio > W8_PPL_RATIO_MIN


def test_cli_eval_kld_json(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "llmzip", "eval", "kld", str(smollm2_dir), str(smollm2_dir),
                          "--ctx", "128", "--max-windows", "2", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mean_kld"] == 0.0 and r["top1_agreement"] == 1.0 and r["tokens"] == 2 * 127


def test_cli_refuses_different_tokenizers(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    model = tiny_llama()
    model.save_pretrained(tmp_path / "other")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(tmp_path / "other")
    out = subprocess.run([sys.executable, "-m", "llmzip", "eval", "kld", str(smollm2_dir), str(tmp_path / "other"),
                          "--ctx", "64", "--max-windows", "1"], capture_output=True, text=True)
    assert out.returncode == 2 and "different tokenizers" in out.stderr
