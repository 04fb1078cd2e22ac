"""Layer-by-layer weight loading (llmzip.lazy) gives the same checkpoint as loading the whole model."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig

import llmzip
from llmzip.calibration import CalibConfig
from llmzip.config import QuantConfig, WeightScheme
from llmzip.lazy import load_lazy

COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
              max_position_embeddings=256)
MODELS = {
    "llama-tied": LlamaConfig(intermediate_size=128, tie_word_embeddings=True, **COMMON),
    "llama": LlamaConfig(intermediate_size=128, tie_word_embeddings=False, **COMMON),
    "mixtral": MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                             tie_word_embeddings=False, **COMMON),
}


@pytest.fixture(scope="module")
def model_dirs(smollm2_dir, tmp_path_factory):
    """Random models (vocab of SmolLM2's tokenizer, saved with it) on disk."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    dirs = {}
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = d
    return dirs


def _tensors(out):
    return load_file(out / "model.safetensors")


def test_skeleton_holds_only_what_lies_outside_the_layers(model_dirs):
    model, _, _ = load_lazy(model_dirs["llama-tied"], None, lambda m: "model.layers")
    meta = {n for n, p in model.named_parameters() if p.is_meta}
    assert meta and all(n.startswith("model.layers.") for n in meta)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied after loading


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_lazy_and_eager_checkpoints_are_bit_identical(model_dirs, tmp_path, name, method):
    cfg = QuantConfig(method=method, weights=WeightScheme(4, 32))
    calib = CalibConfig(samples=4, seq_len=32)
    out = {}
    for lazy in (True, False):
        out[lazy] = tmp_path / f"lazy-{lazy}"
        llmzip.quantize(str(model_dirs[name]), cfg, output_dir=out[lazy], calib=calib, progress=False, lazy=lazy)
    a, b = _tensors(out[True]), _tensors(out[False])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
