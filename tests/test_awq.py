"""AWQ: the pure searches, folding scales (function-preserving), and the layer runner."""

import pytest
import torch
from helpers import tiny_llama

from llmzip.algorithms.awq import apply_clip, fake_quant, output_error, search_clip, search_scales
from llmzip.api import quantize_model
from llmzip.arch import ARCHS, Smooth, UnsupportedArchitecture, arch_of
from llmzip.config import QuantConfig, WeightScheme
from llmzip.sequential import calibrate_model
from llmzip.smoothing import applicable, fold_scales
from llmzip.surgery import targets

ERROR_REL_TOL = 1e-5  # float rounding between two computations of the same output error
AWQ_VS_RTN_MAX = 0.8  # scale-searched error / RTN error when a few channels are salient
CLIP_RATIO_MIN = 0.5  # search_clip's default grid floor (min_ratio); 1.0 means no clipping
FOLD_REL_ERR_MAX = 1e-5  # float32 logits after folding smoothing scales vs before


def _acts(n=2048, in_f=256, seed=0):
    """Activations with a few large 'salient' channels, as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g)
    x[:, :8] *= 20.0
    return x


@pytest.mark.parametrize("scheme", [WeightScheme(4, 64), WeightScheme(3, 64, False), WeightScheme(4, None)],
                         ids=["w4g64", "w3g64asym", "w4ch"])
def test_scale_search_never_worse_than_rtn(scheme):
    x = _acts()
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(128, 256, generator=g) * 0.02 for _ in range(3)]
    s, info = search_scales(x, x.abs().mean(0), ws, scheme, grid=20)
    approx = [fake_quant(w * s, scheme) / s for w in ws]
    err = output_error(x, ws, approx)
    assert err == pytest.approx(info["error"], rel=ERROR_REL_TOL)
    assert info["error"] <= info["error_rtn"]
    assert info["alpha"] > 0 and info["error"] < AWQ_VS_RTN_MAX * info["error_rtn"]  # salient channels make scaling pay


def test_clip_search_never_worse_per_group():
    x = _acts(n=512)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    w[:, 100] = 0.2  # an outlier weight that stretches its group's range
    scheme = WeightScheme(3, 64)
    ratio = search_clip(x, w, scheme)
    assert ratio.shape == (64, 4) and bool(((ratio >= CLIP_RATIO_MIN) & (ratio <= 1.0)).all())

    def group_err(wq):
        d = (wq - w).reshape(64, 4, 64)
        return torch.einsum("tgk,ogk->tog", x.reshape(512, 4, 64), d).pow(2).sum(0)

    clipped = fake_quant(apply_clip(w, ratio, 64), scheme)
    plain = fake_quant(w, scheme)
    assert bool((group_err(clipped) <= group_err(plain) * (1 + ERROR_REL_TOL)).all())


def test_fold_scales_preserves_the_float_function():
    model = tiny_llama(dtype=torch.float32)
    layer = model.model.layers[0]
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        for m in ARCHS["llama"].awq:
            if applicable(layer, m):
                width = layer.get_submodule(m.balance[0]).in_features
                fold_scales(layer, m, torch.rand(width, generator=torch.Generator().manual_seed(3)) + 0.5)
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()).item() < FOLD_REL_ERR_MAX


def test_gqa_value_mapping_is_skipped():
    layer = tiny_llama().model.layers[0]  # 4 heads, 2 kv heads: v_proj out 64, o_proj in 128
    assert not applicable(layer, Smooth("self_attn.v_proj", ("self_attn.o_proj",)))
    assert applicable(layer, Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj")))


def test_unsupported_architecture_lists_supported():
    model = tiny_llama()
    model.config.model_type = "mamba"
    with pytest.raises(UnsupportedArchitecture, match="supported: gemma.*llama.*arch.py"):
        arch_of(model)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_runner_beats_rtn_on_tiny_llama(method):
    ids = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(1))
    test = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_llama(dtype=torch.float32)(test).logits

    def err(model):
        with torch.no_grad():
            return ((model(test).logits - ref).norm() / ref.norm()).item()

    base = tiny_llama(dtype=torch.float32)
    quantize_model(base, QuantConfig(weights=WeightScheme(3, 32)), progress=False)
    model = tiny_llama(dtype=torch.float32)
    cfg = QuantConfig(method=method, weights=WeightScheme(3, 32))
    names, _ = targets(model, cfg)
    report = calibrate_model(model, cfg, ids, names, progress=False)
    awq = report["blocks"][0]["awq"]
    assert set(awq) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}  # v->o skipped (GQA)
    assert all(v["error"] <= v["error_rtn"] for v in awq.values())
    assert err(model) < err(base)
