"""Mixture-of-experts models: unfused experts, every expert calibrated, per-expert export."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

import llmzip
from llmzip.arch import UnsupportedArchitecture
from llmzip.config import QuantConfig, WeightScheme
from llmzip.moe import LinearExperts, prepare_experts
from llmzip.quant_linear import QuantLinear
from llmzip.sequential import calibrate_model
from llmzip.surgery import targets

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
EXPERTS, TOP_K = 4, 2
CASES = {  # config, checkpoint name of layer 0's expert 0 gate projection
    "mixtral": (MixtralConfig(intermediate_size=128, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, **COMMON),
                "model.layers.0.block_sparse_moe.experts.0.w1"),
    "qwen2_moe": (Qwen2MoeConfig(moe_intermediate_size=64, shared_expert_intermediate_size=128, intermediate_size=128,
                                 num_experts=EXPERTS, num_experts_per_tok=TOP_K, **COMMON),
                  "model.layers.0.mlp.experts.0.gate_proj"),
    # Layer 1 dense (mlp_only_layers), as some Qwen3-MoE models have.
    "qwen3_moe": (Qwen3MoeConfig(moe_intermediate_size=64, intermediate_size=128, num_experts=EXPERTS,
                                 num_experts_per_tok=TOP_K, head_dim=16, mlp_only_layers=[1], **COMMON),
                  "model.layers.0.mlp.experts.0.gate_proj"),
}
SAMPLES, SEQ = 4, 32
UNFUSE_ABS_ERR_MAX = 1e-5  # logits after unfusing the experts into Linears vs fused (fp32)
W8_REL_ERR_MAX = 0.02  # W8 awq+gptq logits vs float: rounding only; a router left unscaled shows far above
UNROUTED_VS_PEER_ERR_MAX = 1.5  # rel_err of an expert the router never picks / its peers' worst
RELOAD_ABS_ERR_MAX = 1e-4  # logits of the quantized model vs llmzip.load and transformers loads of its export
FOLD_ABS_ERR_MAX = 1e-4  # a layer's output after folding smoothing scales vs before (fp32)


def _model(name):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CASES[name][0], dtype=torch.float32).eval()


def _ids():
    return torch.randint(3, 256, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(CASES))
def test_unfused_experts_compute_the_same_function(name):
    model = _model(name)
    with torch.no_grad():
        ref = model(_ids()).logits
    assert len(prepare_experts(model)) == sum(isinstance(m, LinearExperts) for m in model.modules()) > 0
    with torch.no_grad():
        out = model(_ids()).logits
    assert (out - ref).abs().max().item() < UNFUSE_ABS_ERR_MAX


@pytest.mark.parametrize("name", sorted(CASES))
def test_awq_gptq_calibrates_every_expert(name):
    model = _model(name)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    prepare_experts(model)
    cfg = QuantConfig(method="awq+gptq", weights=WeightScheme(8, 32))
    names, ignored = targets(model, cfg)
    expert_linears = [n for n in names if ".experts." in n]
    moe_layers = 1 if name == "qwen3_moe" else 2
    assert len(expert_linears) == moe_layers * EXPERTS * 3
    if name == "qwen2_moe":  # its one-output gate is read by vLLM as a plain Linear
        assert {n for n in ignored if "shared_expert_gate" in n} == {
            f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}
    report = calibrate_model(model, cfg, ids, names, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(names) == len(report["layers"])
    for block in report["blocks"][:moe_layers]:
        (counts,) = block["expert_tokens"].values()
        assert sum(counts) == SAMPLES * SEQ * TOP_K  # every token went to TOP_K experts
        # The router-side mapping (norm -> all experts' gate/up, router follows) and
        # one up -> down mapping per expert were applied.
        assert "post_attention_layernorm" in block["awq"]
        assert sum(k.startswith("mlp.experts.") for k in block["awq"]) == EXPERTS
    with torch.no_grad():
        out = model(ids).logits
    # 8-bit: rounding error only. Smoothing that forgot to rescale the router would
    # change routing and show far above this.
    assert ((out - ref).norm() / ref.norm()).item() < W8_REL_ERR_MAX


def test_an_expert_the_router_never_picks_still_gets_a_full_hessian():
    model = _model("qwen3_moe")
    prepare_experts(model)
    router = model.model.layers[0].mlp.gate
    forward = router.forward

    def never_expert_3(hidden):  # send expert 3's tokens to expert 0 instead
        logits, weights, index = forward(hidden)
        return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    router.forward = never_expert_3
    cfg = QuantConfig(method="gptq", weights=WeightScheme(4, 32))
    names, _ = targets(model, cfg)
    report = calibrate_model(model, cfg, _ids(), names, progress=False)
    (counts,) = report["blocks"][0]["expert_tokens"].values()
    assert counts[3] == 0
    e3 = {n: s for n, s in report["layers"].items() if ".experts.3." in n and n.startswith("model.layers.0.")}
    others = [s["rel_err"] for n, s in report["layers"].items() if ".experts.0." in n]
    assert len(e3) == 3
    # No damping escalation (an empty Hessian would need it) and an error like its peers'.
    assert all(s["damp"] == cfg.gptq.damp for s in e3.values())
    assert max(s["rel_err"] for s in e3.values()) < UNROUTED_VS_PEER_ERR_MAX * max(others)


def test_moe_checkpoint_uses_original_expert_names_and_reloads(tmp_path):
    model = _model("mixtral")
    ids = _ids()
    cfg = QuantConfig(method="gptq", weights=WeightScheme(4, 32))
    from llmzip.api import quantize
    from llmzip.calibration import CalibConfig

    class Tok:  # calibration ids come from `calib`, so a tokenizer stand-in is enough
        def __call__(self, text, **kw):
            return {"input_ids": ids.flatten().tolist()}

        def save_pretrained(self, path):
            pass

    q, report = quantize(model, cfg, output_dir=tmp_path / "out", tokenizer=Tok(), progress=False,
                         calib=CalibConfig(samples=SAMPLES, seq_len=SEQ))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    gate = CASES["mixtral"][1]
    assert {f"{gate}.weight_packed", f"{gate}.weight_scale", f"{gate}.weight_shape"} <= keys
    assert not any(".mlp." in k or "gate_up_proj" in k for k in keys)
    meta = json.loads((tmp_path / "out" / "llmzip.json").read_text())
    assert sum(meta["blocks"][0]["expert_tokens"]["mlp.experts"]) == SAMPLES * SEQ * TOP_K
    loaded = llmzip.load(tmp_path / "out", dtype=torch.float32)
    # transformers (>= 5) fuses the experts again at load, dequantizing them.
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        a, b, c = q(ids).logits, loaded(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() < RELOAD_ABS_ERR_MAX
    assert (a - c).abs().max().item() < RELOAD_ABS_ERR_MAX


def test_rtn_quantizes_experts_too():
    model = _model("qwen2_moe")
    q, report = llmzip.quantize(model, QuantConfig(method="rtn", weights=WeightScheme(4, 32)), progress=False)
    assert sum(".experts." in n for n in report["quantized"]) == 2 * EXPERTS * 3
    assert not any("shared_expert_gate" in n for n in report["quantized"])


def test_unknown_moe_architecture_is_refused_clearly():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        OlmoeConfig(intermediate_size=64, num_experts=EXPERTS, num_experts_per_tok=TOP_K, **COMMON))
    with pytest.raises(UnsupportedArchitecture, match="mixtral, qwen2_moe, qwen3_moe"):
        prepare_experts(model)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_smoothing_mapping_keeps_the_float_function(name):
    """Folding any scales through each (expanded) AWQ mapping leaves the layer's output
    unchanged, router included; scales far from 1 make a missed reader obvious."""
    from llmzip.arch import ARCHS
    from llmzip.smoothing import applicable, expand, fold_scales

    model = _model(name)
    prepare_experts(model)
    arch = ARCHS[name]
    g = torch.Generator().manual_seed(1)
    for i, layer in enumerate(model.model.layers):
        x = torch.randn(1, SEQ, 64, generator=g)
        pos = torch.arange(SEQ)[None]
        emb = model.model.rotary_emb(x, pos)
        with torch.no_grad():
            ref = layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
            applied = 0
            for m in (c for m in arch.awq for c in expand(layer, m)):
                if applicable(layer, m):
                    width = layer.get_submodule(m.balance[0]).in_features
                    fold_scales(layer, m, torch.rand(width, generator=g) * 1.5 + 0.5, arch.norm_offset)
                    applied += 1
            out = layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
        moe = i == 0 or name != "qwen3_moe"
        # attn (norm->qkv, v->o), norm->experts, one up->down per expert [, shared up->down] | dense mlp (2)
        assert applied == 2 + (1 + EXPERTS + (name == "qwen2_moe") if moe else 2)
        assert (out - ref).abs().max().item() < FOLD_ABS_ERR_MAX


def test_true_sequential_gptq_on_moe():
    from llmzip.config import GPTQSettings

    model = _model("qwen2_moe")
    prepare_experts(model)
    cfg = QuantConfig(method="gptq", weights=WeightScheme(4, 32), gptq=GPTQSettings(true_sequential=True))
    names, _ = targets(model, cfg)
    report = calibrate_model(model, cfg, _ids(), names, progress=False)
    # q/k/v; o; shared + routed experts' gate/up (one input); shared down; each expert's down
    assert [b["groups"] for b in report["blocks"]] == [4 + EXPERTS] * 2
    assert len(report["layers"]) == len(names)
