"""The KV cache scheme registry (llmzip/kv_schemes.py) is what every reader of a scheme uses:
the CLI's choices, the transformers cache's config, the serving pool and `llmzip info`."""

import pytest
import torch

from llmzip import kv_schemes
from llmzip.cli import build_parser
from llmzip.kv_cache import KVCacheConfig, bytes_per_token
from llmzip.kv_schemes import SCHEMES

# SmolLM2-135M's attention: 3 KV heads of 64 channels. Bytes per token and layer, K and V:
# bf16 2*3*64*2; int8 codes + fp16 scale + uint8 zero per token and head; fp8 one byte each;
# KIVI codes + an fp16 (scale, min) per channel and 32 tokens (keys) and per token and 32
# channels (values).
KV_HEADS, HEAD_DIM = 3, 64
EXPECTED_BYTES = {"auto": 768.0, "int8": 402.0, "fp8": 384.0, "int4": 240.0, "int2": 144.0}


def test_every_scheme_has_its_size_from_one_formula():
    assert set(SCHEMES) == set(EXPECTED_BYTES)
    for name, expected in EXPECTED_BYTES.items():
        assert SCHEMES[name].bytes_per_token(KV_HEADS, HEAD_DIM) == expected, name
        if SCHEMES[name].quantized:  # the transformers cache's config reads the same entry
            assert bytes_per_token(KVCacheConfig(name, residual=0), KV_HEADS, HEAD_DIM) == expected
            assert KVCacheConfig(name).bits == SCHEMES[name].bits
    assert bytes_per_token(None, KV_HEADS, HEAD_DIM) == EXPECTED_BYTES["auto"]


def test_cli_choices_come_from_the_registry():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    serve = next(a for a in sub["serve"]._actions if a.dest == "kv_cache_dtype")
    quantize = next(a for a in sub["quantize"]._actions if a.dest == "kv_cache")
    ppl = next(a for a in next(a for a in sub["eval"]._actions if a.dest == "eval_command").choices["ppl"]._actions
               if a.dest == "kv_cache")
    assert tuple(serve.choices) == kv_schemes.NAMES
    assert tuple(ppl.choices) == kv_schemes.QUANTIZED
    assert tuple(quantize.choices) == kv_schemes.CALIBRATED == ("fp8",)
    # one option name everywhere; the older --kv-cache still parses
    assert "--kv-cache-dtype" in quantize.option_strings and "--kv-cache-dtype" in ppl.option_strings
    assert parser.parse_args(["quantize", "m", "--kv-cache", "fp8", "-o", "x"]).kv_cache == "fp8"


@pytest.mark.parametrize("name", kv_schemes.NAMES)
def test_the_serving_pool_sizes_and_stores_each_scheme_as_registered(name):
    from llmzip.serve.kv_pool import STORE_DTYPES, KVPool

    scheme = SCHEMES[name]
    layers = 2
    pool = KVPool(layers, 4, KV_HEADS, HEAD_DIM, torch.bfloat16, "cpu", scheme.page, name, slots=2)
    assert pool.scheme is scheme
    assert pool.bytes_per_token() == scheme.bytes_per_token(KV_HEADS, HEAD_DIM, 2, scheme.page) * layers
    assert pool.k[0].dtype == STORE_DTYPES.get(scheme.layout, torch.bfloat16)
    assert pool.kivi == scheme.kivi


def test_unknown_scheme_names_every_choice():
    with pytest.raises(ValueError, match="choose one of auto, int8, fp8, int4, int2"):
        kv_schemes.get("int3")


def test_vllm_hand_off_refuses_the_schemes_vllm_lacks():
    from llmzip.serve.server import ServeOptions, vllm_command

    for name, scheme in SCHEMES.items():
        opts = ServeOptions("m", kv_cache_dtype=name)
        if scheme.vllm:
            assert vllm_command(opts)[vllm_command(opts).index("--kv-cache-dtype") + 1] == name
        else:
            with pytest.raises(ValueError, match=f"no {name} KV cache"):
                vllm_command(opts)
