import pytest
import torch

from llmzip.algorithms import rtn
from llmzip.config import ClipSearch, ConfigError, QuantConfig, WeightScheme
from llmzip.primitives import dequantize, sqnr_db

HALF_SCALE_SLACK = 1e-6  # relative slack on |error| <= scale / 2: fp32 rounding of q * scale
SQNR_MIN_DB = {8: 42.0, 4: 18.0, 3: 11.5}  # by bits: RTN g64 SQNR (dB) of a Gaussian weight with an outlier
CLIP_ABS_SLACK = 1e-12  # fp32 slack when a clipped group's squared error must not exceed min-max's
CLIP_VS_MINMAX_MAX = 0.9  # W3 g64 clip search squared error / min-max's; measured 0.71 (sym), 0.82 (asym)


def _weight(out=48, inp=192, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3, 5] = 0.3  # an outlier, as real weights have
    return w.to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bounded_by_half_scale(bits, group_size, symmetric):
    scheme = WeightScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    w = _weight()
    res = rtn(w, scheme)
    assert res.q.dtype == torch.int8 and res.scale.dtype == w.dtype
    assert int(res.q.min()) >= scheme.qmin and int(res.q.max()) <= scheme.qmax
    dq = dequantize(res.q, res.scale, res.zero, group_size, torch.float32)
    g = group_size or w.shape[1]
    err = (dq - w.float()).abs().reshape(w.shape[0], -1, g).amax(-1)
    half = res.scale.float() / 2
    assert bool((err <= half * (1 + HALF_SCALE_SLACK)).all()), float((err / half).max())


@pytest.mark.parametrize("bits,min_db", list(SQNR_MIN_DB.items()))
def test_sqnr_per_bit_width(bits, min_db):
    w = _weight(dtype=torch.float32)
    res = rtn(w, WeightScheme(bits=bits, group_size=64))
    dq = dequantize(res.q, res.scale, res.zero, 64, torch.float32)
    assert sqnr_db(w, dq) >= min_db


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_than_minmax(symmetric):
    scheme = WeightScheme(bits=3, group_size=64, symmetric=symmetric)
    w = _weight(dtype=torch.float32, seed=1)

    def err(res):
        return (dequantize(res.q, res.scale, res.zero, 64, torch.float32) - w).pow(2).reshape(48, -1, 64).sum(-1)

    plain, clipped = err(rtn(w, scheme)), err(rtn(w, scheme, ClipSearch(grid=20)))
    assert bool((clipped <= plain + CLIP_ABS_SLACK).all())
    assert clipped.sum() < CLIP_VS_MINMAX_MAX * plain.sum()


def test_zero_weight_is_exact():
    res = rtn(torch.zeros(4, 64, dtype=torch.bfloat16), WeightScheme(bits=4, group_size=32, symmetric=False))
    assert torch.equal(dequantize(res.q, res.scale, res.zero, 32, torch.float32), torch.zeros(4, 64))


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bad_bits_rejected(bits):
    with pytest.raises(ConfigError, match="from 2 to 8"):
        WeightScheme(bits=bits)


def test_group_that_does_not_divide_names_the_layer():
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.q_proj.*group size 100.*576.*32, 64"):
        WeightScheme(bits=4, group_size=100).check_layer("model.layers.0.q_proj", 576, 576)


def test_bad_method_and_regex_rejected():
    with pytest.raises(ConfigError, match="method 'xyz'"):
        QuantConfig(method="xyz")
    with pytest.raises(ConfigError, match="not a valid regex"):
        QuantConfig(ignore=("(",))


def test_config_round_trips_through_dict():
    c = QuantConfig(weights=WeightScheme(3, None, False), clip=ClipSearch(grid=7), ignore=("lm_head", "gate"))
    assert QuantConfig.from_dict(c.to_dict()) == c


def test_clip_search_default_per_method():
    """'auto': on for gptq (Hessian-weighted), off for rtn and the AWQ methods; explicit wins."""
    assert QuantConfig(method="gptq").clip == ClipSearch()
    assert QuantConfig(method="rtn").clip is None
    assert QuantConfig(method="awq").clip is None and QuantConfig(method="awq+gptq").clip is None
    assert QuantConfig(method="gptq", clip=None).clip is None
    c = QuantConfig(method="gptq")
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="clip="):
        QuantConfig(clip="on")


# W4/W3/W2 g32 clip search squared error, signed / positive-only grid; measured 0.854 / 0.841 / 0.763
SIGNED_VS_UNSIGNED_MAX = {4: 0.95, 3: 0.92, 2: 0.85}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_signed_grid_and_refit_lower_the_search_error(bits):
    """ClipSearch.signed: symmetric groups may take the sign-flipped grid (a negative scale,
    their larger end on qmin), so the search error drops below the positive-only search's
    by a named margin; least-squares refits (ClipSearch.refit) never raise any group's
    error; every stored scale is a bf16 value and codes stay in [qmin, qmax]."""
    scheme = WeightScheme(bits=bits, group_size=32, symmetric=True)
    w = _weight(dtype=torch.bfloat16, seed=2)

    def err(res):
        dq = dequantize(res.q, res.scale, res.zero, 32, torch.float32)
        return (dq - w.float()).pow(2).reshape(48, -1, 32).sum(-1)

    unsigned = rtn(w, scheme, ClipSearch(grid=20, signed=False, refit=0))
    signed = rtn(w, scheme, ClipSearch(grid=20, signed=True, refit=0))
    refit = rtn(w, scheme, ClipSearch(grid=20, signed=True, refit=2))
    assert bool((signed.scale < 0).any()) and bool((signed.scale > 0).any())
    assert bool((err(signed) <= err(unsigned) + CLIP_ABS_SLACK).all())
    assert err(signed).sum() < SIGNED_VS_UNSIGNED_MAX[bits] * err(unsigned).sum()
    assert bool((err(refit) <= err(signed) + CLIP_ABS_SLACK).all())
    assert refit.scale.dtype == torch.bfloat16
    assert int(refit.q.min()) >= scheme.qmin and int(refit.q.max()) <= scheme.qmax


def test_signed_scale_maps_the_larger_end_onto_qmin():
    """primitives.signed_qparams: a positive extreme gets a negative scale and code qmin,
    exactly; a negative extreme gets a positive scale and code qmin; asymmetric unaffected."""
    from llmzip.primitives import quantize, signed_qparams

    scheme = WeightScheme(bits=4, group_size=4, symmetric=True)
    w = torch.tensor([[0.8, -0.2, 0.1, 0.0], [-0.8, 0.2, 0.1, 0.0]])
    scale = signed_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), scheme, torch.float32)
    assert abs(scale[0, 0].item() + 0.1) < 1e-7
    assert abs(scale[1, 0].item() - 0.1) < 1e-7
    q = quantize(w, scale, None, scheme)
    assert q[:, 0].tolist() == [scheme.qmin, scheme.qmin]
    assert torch.allclose(dequantize(q, scale, None, 4, torch.float32)[:, 0], w[:, 0])


@pytest.mark.parametrize("scheme", [WeightScheme(4, 32), WeightScheme(3, 64, False), WeightScheme(2, None)],
                         ids=["w4g32", "w3g64asym", "w2ch"])
@pytest.mark.parametrize("weighted", [False, True], ids=["mse", "hessian"])
def test_clip_search_chunks_pick_what_one_pass_picks(scheme, weighted, monkeypatch):
    """The clip search scores its candidates in chunks of SEARCH_CHUNK_ELEMS elements; one
    candidate per chunk (the smallest) must pick exactly the scales and zeros of one pass
    over all of them (the first of equal errors wins either way)."""
    from llmzip import primitives

    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 128, generator=g) * torch.rand(48, 1, generator=g)
    w[:, 5] *= 8  # an outlier column, so clipping pays in some groups
    w = w.round(decimals=2)  # ties between candidates happen
    hessian = None
    if weighted:
        x = torch.randn(256, 128, generator=g) * torch.rand(128, generator=g) * 3
        hessian = x.t() @ x / 256
        scheme = WeightScheme(scheme.bits, None, scheme.symmetric)  # one group spans the columns
    one_pass = primitives.mse_clip_qparams(w, scheme, torch.bfloat16, ClipSearch(), hessian=hessian)
    monkeypatch.setattr(primitives, "SEARCH_CHUNK_ELEMS", 1)
    chunked = primitives.mse_clip_qparams(w, scheme, torch.bfloat16, ClipSearch(), hessian=hessian)
    assert torch.equal(one_pass[0], chunked[0])
    assert (one_pass[1] is None and chunked[1] is None) or torch.equal(one_pass[1], chunked[1])
