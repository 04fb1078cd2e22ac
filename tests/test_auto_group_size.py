"""`llmzip quantize` without --group-size picks a group size that fits the model.

128 where it divides the input features of every quantized Linear, else the largest of
64/32 that does (logged once). An explicit --group-size, and the Python API's
QuantConfig, stay as given: a size that does not divide a layer is an error.
"""

import json
import logging

import pytest

import llmzip
from llmzip.api import AUTO_GROUP_SIZES, fit_group_size
from llmzip.cli import EXIT_BAD_INPUT, main
from llmzip.config import ConfigError

from helpers import run_cli, tiny_llama

DEFAULT_GROUP = 128  # QuantConfig's (and --group-size auto's first choice)


def tiny(hidden: int, intermediate: int):
    heads = 2 if hidden % 64 == 0 else 3
    return tiny_llama(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=1)


@pytest.mark.parametrize("hidden, intermediate, expected", [
    (128, 256, 128),  # 128 divides every layer
    (128, 320, 64),  # down_proj's 320 input features decide
    (192, 384, 64),
    (96, 192, 32),
])
def test_largest_group_that_divides_every_layer(hidden, intermediate, expected):
    fitted = fit_group_size(tiny(hidden, intermediate), llmzip.QuantConfig())
    assert fitted.weights.group_size == expected
    assert fitted.weights.bits == llmzip.QuantConfig().weights.bits  # nothing else changes


def test_ignored_layers_do_not_count():
    config = llmzip.QuantConfig(ignore=(r"lm_head$", r"down_proj$"))
    assert fit_group_size(tiny(128, 320), config).weights.group_size == DEFAULT_GROUP


def test_no_candidate_fits_names_the_layer_and_the_way_out():
    with pytest.raises(ConfigError, match=r"no group size of 128/64/32 divides the 48 input features of layer "
                                          r"'model\.layers\.0\.self_attn\.q_proj': use --group-size -1"):
        fit_group_size(tiny(48, 96), llmzip.QuantConfig())


def test_python_api_stays_explicit():
    assert llmzip.QuantConfig().weights.group_size == DEFAULT_GROUP
    with pytest.raises(ConfigError, match="group size 128 does not divide its 96 input features"):
        llmzip.quantize(tiny(96, 192), llmzip.QuantConfig(), progress=False)


def test_smollm2_gets_64(smollm2_dir):
    """The demo model's 576 input features: 128 does not divide them, 64 does."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_dir))
    assert fit_group_size(model, llmzip.QuantConfig(weights=llmzip.WeightScheme(bits=8))).weights.group_size == 64


@pytest.fixture(scope="module")
def model96(smollm2_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("g") / "m96"
    tiny(96, 192).save_pretrained(d)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(d)
    return d


def test_cli_default_picks_a_fitting_group_and_logs_it_once(model96, tmp_path, caplog):
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO, logger="llmzip"):
        assert run_cli("quantize", model96, "-o", out) == 0
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["group_0"]["weights"]["group_size"] == AUTO_GROUP_SIZES[-1]
    said = [r.getMessage() for r in caplog.records if "(auto)" in r.getMessage()]
    assert said == ["group size 32 (auto): 128/64 does not divide every quantized layer "
                    "(model.layers.0.self_attn.q_proj has 96 input features); --group-size sets it"]


@pytest.mark.parametrize("group", ["128", "64"])
def test_cli_explicit_group_still_fails_loudly(model96, tmp_path, capsys, group):
    assert run_cli("quantize", model96, "-o", tmp_path / "o", "--group-size", group) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"group size {group} does not divide its 96 input features" in err[0]
    assert not (tmp_path / "o").exists()


def test_help_documents_auto(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "auto = 128 where it divides every quantized layer's input features" in text
    assert "(default: auto)" in text


@pytest.mark.slow
def test_demo_model_quantizes_with_default_settings(smollm2_dir, tmp_path):
    out = tmp_path / "w8"
    assert run_cli("quantize", "smollm2-135m", "--bits", "8", "-o", out) == 0
    meta = json.loads((out / "llmzip.json").read_text())
    assert meta["config"]["weights"] == {"bits": 8, "group_size": 64, "symmetric": True}
