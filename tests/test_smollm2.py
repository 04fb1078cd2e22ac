"""Integration tests on the real SmolLM2-135M (bf16, converted once per session).

Perplexity uses the first 4 windows of 1024 tokens of the built-in Wikipedia text
(4092 scored tokens): enough to separate the settings below, small enough for CI.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmzip import QuantConfig, WeightScheme, load, quantize
from llmzip.calibration import CalibConfig
from llmzip.config import AWQSettings
from llmzip.eval.perplexity import perplexity
from llmzip.models import load_pretrained

pytestmark = pytest.mark.slow
CTX, WINDOWS = 1024, 4
# Bounds on perplexity over those windows (ratios: quantized ppl / bf16 ppl, or / RTN ppl at the same bits).
BF16_PPL_MIN, BF16_PPL_MAX = 10, 30  # bf16 ppl: measured 21.70; random weights would give ~49152
W8_PPL_RATIO_MAX = 1.005  # W8 per-channel / bf16: measured 1.0037
W4_SYM_PPL_RATIO_MAX = 1.45  # W4 g64 symmetric RTN / bf16: measured 1.390
W4_ASYM_PPL_RATIO_MAX = 1.35  # W4 g64 asymmetric RTN / bf16: measured 1.288
HF_REL_ERR_MAX = 1e-3  # W4 g64 export, logits: transformers load vs llmzip load
GPTQ_VS_RTN_W4_MAX = 0.99  # W4 GPTQ / RTN ppl: measured 1.344 vs 1.390 (ppl / bf16)
GPTQ_VS_RTN_W3_MAX = 0.8  # W3 GPTQ / RTN ppl: measured 4.21 vs 6.16 (ppl / bf16)
AWQ_VS_RTN_W4_MAX = 0.92  # W4 AWQ / RTN ppl: measured 1.195 vs 1.390 (ppl / bf16), default grids


def _ppl(model, ids):
    return perplexity(model, ids, ctx=CTX, max_windows=WINDOWS, progress=False).ppl


@pytest.fixture(scope="module")
def bf16_ppl(smollm2_dir, wiki_ids):
    model, _ = load_pretrained(str(smollm2_dir))
    return _ppl(model, wiki_ids)


def test_converted_model_is_a_real_language_model(smollm2_dir, bf16_ppl):
    model, tok = load_pretrained(str(smollm2_dir))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.bfloat16 and tok.chat_template
    assert BF16_PPL_MIN < bf16_ppl < BF16_PPL_MAX


def test_w8_per_channel_within_half_percent(smollm2_dir, wiki_ids, bf16_ppl):
    model, _ = quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(8, None)), progress=False)
    assert _ppl(model, wiki_ids) / bf16_ppl < W8_PPL_RATIO_MAX


def test_w4_g64_bounds(smollm2_dir, wiki_ids, bf16_ppl):
    # Measured ratios: sym 1.390, asym 1.288. SmolLM2-135M is small and its weights
    # sit on a Q4_1 g32 asymmetric grid, so a g64 re-grid costs much more than on
    # larger models; calibrated methods (GPTQ/AWQ) are expected to close the gap.
    sym, _ = quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(4, 64, True)), progress=False)
    asym, _ = quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(4, 64, False)), progress=False)
    r_sym, r_asym = _ppl(sym, wiki_ids) / bf16_ppl, _ppl(asym, wiki_ids) / bf16_ppl
    assert r_sym < W4_SYM_PPL_RATIO_MAX
    assert r_asym < W4_ASYM_PPL_RATIO_MAX
    assert r_asym < r_sym  # a zero point helps on skewed groups


def test_transformers_load_matches_llmzip_load(smollm2_dir, tmp_path, reference_kernel):
    quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(4, 64, True)), output_dir=tmp_path / "q",
             progress=False)
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        ours = load(tmp_path / "q")(ids).logits.float()
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q")(ids).logits.float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < HF_REL_ERR_MAX


# -- calibrated methods (CI-sized calibration: 16 x 256 tokens of the built-in "lee" text) --

CALIB = CalibConfig(samples=16, seq_len=256)


@pytest.fixture(scope="module")
def rtn_ppl(smollm2_dir, wiki_ids):
    out = {}
    for bits in (3, 4):
        model, _ = quantize(str(smollm2_dir), QuantConfig(weights=WeightScheme(bits, 64)), progress=False)
        out[bits] = _ppl(model, wiki_ids)
    return out


def test_gptq_beats_rtn_at_w4_and_w3(smollm2_dir, wiki_ids, bf16_ppl, rtn_ppl):
    ppl = {}
    for bits in (4, 3):
        model, report = quantize(str(smollm2_dir), QuantConfig(method="gptq", weights=WeightScheme(bits, 64)),
                                 calib=CALIB, progress=False)
        assert len(report["blocks"]) == 30 and len(report["layers"]) == 210
        ppl[bits] = _ppl(model, wiki_ids)
    # Measured ppl / bf16: W4 RTN 1.390 -> GPTQ 1.344; W3 RTN 6.16 -> GPTQ 4.21.
    assert ppl[4] < GPTQ_VS_RTN_W4_MAX * rtn_ppl[4]
    assert ppl[3] < GPTQ_VS_RTN_W3_MAX * rtn_ppl[3]


def test_awq_beats_rtn_at_w4(smollm2_dir, wiki_ids, rtn_ppl):
    cfg = QuantConfig(method="awq", weights=WeightScheme(4, 64), awq=AWQSettings(clip_grid=10, max_tokens=2048))
    model, report = quantize(str(smollm2_dir), cfg, calib=CALIB, progress=False)
    alphas = [m["alpha"] for b in report["blocks"] for m in b["awq"].values()]
    assert len(alphas) == 90 and max(alphas) > 0  # 3 mappings x 30 layers (v->o skipped: GQA)
    # Measured with the default grids: RTN 1.390 -> AWQ 1.195 (ppl / bf16).
    assert _ppl(model, wiki_ids) < AWQ_VS_RTN_W4_MAX * rtn_ppl[4]
