"""Calibrated quantization on tiny random models of each supported architecture."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Phi3Config, Qwen2Config, Qwen3Config)

from llmzip.arch import ARCHS
from llmzip.config import QuantConfig, WeightScheme
from llmzip.quant_linear import QuantLinear
from llmzip.sequential import calibrate_model
from llmzip.surgery import targets

REL_ERR_MAX = 0.02  # W8 awq+gptq logits vs float, per arch; measured 0.004-0.008

COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {  # config, number of AWQ mappings applied per layer (MHA: v->o applies)
    "llama": (LlamaConfig(**COMMON), 4),
    "mistral": (MistralConfig(**COMMON), 4),
    "qwen2": (Qwen2Config(**COMMON), 4),
    "qwen3": (Qwen3Config(head_dim=32, **COMMON), 4),
    "gemma2": (Gemma2Config(head_dim=32, **COMMON), 4),
    "gemma3_text": (Gemma3TextConfig(head_dim=32, **COMMON), 4),
    "phi3": (Phi3Config(**COMMON), 2),
}


def test_every_listed_architecture_has_a_case():
    from test_moe import CASES as MOE_CASES

    assert set(ARCHS) - {"gemma"} == set(CASES) | set(MOE_CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_awq_gptq_quantizes_every_linear(name):
    config, n_maps = CASES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = QuantConfig(method="awq+gptq", weights=WeightScheme(8, 32))
    names, _ = targets(model, cfg)
    report = calibrate_model(model, cfg, ids, names, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(names) == len(report["layers"])
    assert all(len(b["awq"]) == n_maps for b in report["blocks"])
    with torch.no_grad():
        out = model(ids).logits
    # 8-bit, so the error is rounding only (measured 0.004-0.008); a wrong smoothing
    # fold (e.g. ignoring Gemma's 1 + weight norm) would show far above this.
    assert ((out - ref).norm() / ref.norm()).item() < REL_ERR_MAX
