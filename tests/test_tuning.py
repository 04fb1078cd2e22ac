"""End-to-end scale tuning (llmzip.tuning, --tune-epochs)."""

import json

import pytest
import torch

from helpers import tiny_llama
from llmzip.config import ConfigError, GPTQSettings, QuantConfig, SignRoundSettings, TuneSettings, WeightScheme
from llmzip.quant_linear import QuantLinear
from llmzip.sequential import calibrate_model
from llmzip.tuning import ScaleFit, tune_scales

# A tiny random Llama at W2 g32 after GPTQ: 6 epochs of 2 steps cut the mean KL to the
# float model on the calibration tokens to at most this fraction of the first epoch's
# (measured: 0.435).
MAX_KL_LAST_VS_FIRST = 0.6


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def _calibrated(tune: TuneSettings, method="gptq", bits=2, dtype=torch.bfloat16):
    model = tiny_llama(dtype=dtype)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(method=method, weights=WeightScheme(bits, 32), tune=tune,
                      signround=SignRoundSettings(iters=2, batch=2))
    report = calibrate_model(model, cfg, ids, _targets(model), device="cpu", progress=False)
    return model, ids, report


def _quantized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_scale_fit_at_zero_gain_is_the_quantlinear():
    """Before any step, the stand-in computes exactly what the QuantLinear does, asymmetric
    groups and act-order included."""
    for symmetric, act_order in ((True, False), (False, False), (True, True)):
        model = tiny_llama(dtype=torch.float32)
        ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(2))
        cfg = QuantConfig(method="gptq", weights=WeightScheme(3, 32, symmetric=symmetric),
                          gptq=GPTQSettings(act_order=act_order, static_groups=False))
        calibrate_model(model, cfg, ids, _targets(model), device="cpu", progress=False)
        gen = torch.Generator().manual_seed(3)
        for name, ql in _quantized(model).items():
            assert (getattr(ql, "weight_g_idx", None) is not None) == act_order
            x = torch.randn(5, ql.in_features, generator=gen)
            assert torch.equal(ScaleFit(ql, torch.float32)(x), ql(x)), (symmetric, act_order, name)


def test_tuning_lowers_the_kl_and_changes_only_scales():
    model, ids, report = _calibrated(TuneSettings(epochs=0))
    assert "float_outputs" not in report
    model, ids, report = _calibrated(TuneSettings(epochs=6, lr=0.02, batch=4))
    teacher = torch.cat(report["float_outputs"])
    assert teacher.shape == (8, 32, model.config.hidden_size)
    before = {n: (m.weight_packed.clone(), m.weight_scale.clone()) for n, m in _quantized(model).items()}
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    embed = model.model.embed_tokens.weight.clone()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    out = tune_scales(model, ids, teacher, TuneSettings(epochs=6, lr=0.02, batch=4), device="cpu", progress=False)
    assert out["steps"] == 12 and len(out["per_epoch"]) == 6
    assert out["kl_last_epoch"] <= MAX_KL_LAST_VS_FIRST * out["kl_first_epoch"], out
    after = _quantized(model)
    assert set(after) == set(before)  # every QuantLinear is back in place
    changed = 0
    for n, m in after.items():
        assert torch.equal(m.weight_packed, before[n][0])  # codes fixed
        assert m.weight_scale.dtype == torch.bfloat16
        changed += int(not torch.equal(m.weight_scale, before[n][1]))
    assert changed == len(after)
    # the rest of the model is untouched, bit for bit, in its own dtype
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert torch.equal(model.model.embed_tokens.weight, embed) and embed.dtype == torch.bfloat16
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_quantize_records_the_tuning_and_the_checkpoint_loads(tmp_path):
    from helpers import tiny_tokenizer
    from llmzip import load, quantize
    from llmzip.calibration import CalibConfig

    tok = tiny_tokenizer()
    model = tiny_llama(dtype=torch.bfloat16, vocab_size=len(tok))
    cfg = QuantConfig(method="gptq", weights=WeightScheme(4, 32), tune=TuneSettings(epochs=1, batch=2))
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 37} and more words" for i in range(400)))
    _, report = quantize(model, cfg, output_dir=tmp_path / "out", tokenizer=tok,
                         calib=CalibConfig(str(text), samples=4, seq_len=16), progress=False)
    meta = json.loads((tmp_path / "out" / "llmzip.json").read_text())
    assert meta["tune"]["epochs"] == 1 and meta["tune"]["steps"] == 2
    assert meta["config"]["tune"]["epochs"] == 1
    loaded = load(tmp_path / "out")
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_bad_settings_name_the_fix():
    with pytest.raises(ConfigError, match="--tune-epochs"):
        TuneSettings(epochs=-1)
    with pytest.raises(ConfigError, match="--tune-lr"):
        TuneSettings(lr=0.0)
    with pytest.raises(ConfigError, match="calibrated method"):
        QuantConfig(method="rtn", tune=TuneSettings(epochs=1))


def test_step_size_follows_each_linears_width():
    """Left out, the step size is 1e-2 for a Linear below 4 bits and 3e-3 from 4 bits up;
    --tune-lr sets one for every Linear. A mixed-width model gets one Adam group per width."""
    assert [TuneSettings().lr_for(b) for b in (2, 3, 4, 8)] == [1e-2, 1e-2, 3e-3, 3e-3]
    assert [TuneSettings(lr=5e-3).lr_for(b) for b in (2, 4)] == [5e-3, 5e-3]
    model = tiny_llama(dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    names = _targets(model)
    cfg = QuantConfig(method="gptq", weights=WeightScheme(2, 32), tune=TuneSettings(epochs=1, batch=4),
                      schemes={n: WeightScheme(4, 32) for n in names[::2]})
    report = calibrate_model(model, cfg, ids, names, device="cpu", progress=False)
    teacher = torch.cat(report["float_outputs"])
    assert sorted({m.bits for m in _quantized(model).values()}) == [2, 4]
    out = tune_scales(model, ids, teacher, TuneSettings(epochs=1, batch=4), device="cpu", progress=False)
    assert out["lr"] == "by bits" and out["lr_by_bits"] == {"2": 1e-2, "4": 3e-3}
    out = tune_scales(model, ids, teacher, TuneSettings(epochs=1, lr=5e-3, batch=4), device="cpu", progress=False)
    assert out["lr"] == 5e-3 and out["lr_by_bits"] == {"2": 5e-3, "4": 5e-3}


def test_tune_options_reach_the_config(monkeypatch):
    """--tune-epochs/--tune-lr land in QuantConfig.tune; left out, TuneSettings' defaults (off)."""
    import llmzip.api
    from llmzip.cli import build_parser
    from llmzip.commands import quantize
    from llmzip.recipes import apply_recipe

    seen = []

    def capture(model, config, **kw):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(llmzip.api, "quantize", capture)
    for extra in (["--tune-epochs", "2", "--tune-lr", "3e-3"], []):
        args = build_parser().parse_args(["quantize", "m", "-o", "out", "--method", "gptq", *extra])
        apply_recipe(args)
        with pytest.raises(SystemExit):
            quantize(args)
    assert (seen[0].tune.epochs, seen[0].tune.lr) == (2, 3e-3)
    assert seen[1].tune == TuneSettings() and seen[1].tune.epochs == 0 and not seen[1].float_stream
    assert seen[0].float_stream  # GPTQ carries the float stream only to give the tuning its targets


# The tuning's first loss, one step over every sample, is the mean KL between the float
# model's logits and the quantized model's, each computed by the model's own forward pass:
# to this relative tolerance (fp32; the targets come from the float stream, not a re-run).
KL_REL_TOL = 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "phi3"])
def test_first_loss_is_the_kl_between_the_models_own_logits(name):
    """Final norm, LM head and Gemma2's logit soft-capping are applied to the float stream's
    last hidden states exactly as each model's forward applies them."""
    import copy

    import torch.nn.functional as F
    from test_archs import CASES
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(CASES[name][0])
    if name == "gemma2":  # a cap that bends these small random logits, so that leaving it out would show
        config.final_logit_softcapping = 0.05
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    float_model = copy.deepcopy(model)
    ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    tune = TuneSettings(epochs=1, batch=4)
    report = calibrate_model(model, QuantConfig(method="gptq", weights=WeightScheme(3, 32), tune=tune), ids,
                             _targets(model), device="cpu", progress=False)
    with torch.no_grad():
        want = F.kl_div(F.log_softmax(model(ids).logits, -1), F.log_softmax(float_model(ids).logits, -1),
                        log_target=True, reduction="none").sum(-1).mean().item()
    out = tune_scales(model, ids, torch.cat(report["float_outputs"]), tune, device="cpu", progress=False)
    assert out["steps"] == 1
    assert abs(out["kl_first_epoch"] - want) <= KL_REL_TOL * want, (name, out["kl_first_epoch"], want)
