"""`llmzip quantize --kv-cache-dtype fp8`: calibrated static FP8 K/V scales, their export as a
compressed-tensors kv_cache_scheme, and every reader of them (llmzip.load, transformers
with compressed-tensors, the server's KV pool, eval ppl)."""

import json
import re

import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open

from llmzip import QuantConfig, WeightScheme, load, quantize
from llmzip.calibration import CalibConfig
from llmzip.kv_cache import FP8_MAX, attached_fp8_scales, calibrate_fp8_scales

SCALE_RTOL = 1e-6  # calibrated KV scale vs max |K| (or |V|) / FP8_MAX read from a DynamicCache
BF16_STEP = 2**-7  # relative size of one bf16 rounding step: stored scales vs the calibrated ones
HF_REL_ERR_MAX = 2e-2  # bf16 logits, llmzip vs transformers on the fp8-KV export: two kernels
CALIB = CalibConfig(samples=4, seq_len=64)


class Tok:
    """Tokenizer stand-in: calibration ids are windows of a fixed random token stream."""

    def __call__(self, text, **kw):
        return {"input_ids": torch.randint(0, 512, (4096,), generator=torch.Generator().manual_seed(0)).tolist()}

    def save_pretrained(self, path):
        pass
VLLM_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k|v)_scale$")


def _flat(pairs):
    return [x for pair in pairs for x in pair]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("kvfp8") / "q"
    model, report = quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 64), kv_cache="fp8"),
                             output_dir=out, tokenizer=Tok(), calib=CALIB, progress=False)
    return out, model, report


def test_scales_are_max_abs_over_448_of_what_the_cache_stores():
    model = tiny_llama(dtype=torch.float32)
    ids = torch.randint(0, 512, (3, 32))
    scales = calibrate_fp8_scales(model, ids)
    seen = [(0.0, 0.0)] * 2
    for row in ids:  # the same maxima, read from a plain DynamicCache after each forward
        out = model(row[None], use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        for i, layer in enumerate(cache.layers):
            seen[i] = (max(seen[i][0], layer.keys.abs().max().item()), max(seen[i][1], layer.values.abs().max().item()))
    assert len(scales) == 2
    for (k, v), (km, vm) in zip(scales, seen):
        assert k == pytest.approx(km / FP8_MAX, rel=SCALE_RTOL) and v == pytest.approx(vm / FP8_MAX, rel=SCALE_RTOL)


def test_export_names_and_config_are_what_vllm_and_compressed_tensors_read(exported):
    from compressed_tensors.quantization import QuantizationConfig

    out, _, report = exported
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    kv = parsed.kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.dynamic, kv.symmetric) == (8, "float", "tensor", False, True)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = {k: f.get_tensor(k) for k in f.keys() if VLLM_NAME.match(k)}
    assert sorted(names) == [f"model.layers.{i}.self_attn.{x}_scale" for i in range(2) for x in "kv"]
    for name, t in names.items():
        i, which = VLLM_NAME.match(name).groups()
        want = report["kv_scales"][int(i)]["kv".index(which)]
        assert t.shape == (1,) and t.dtype == torch.bfloat16
        assert want <= t.float().item() <= want * (1 + BF16_STEP)  # rounded up to bf16: never clips


def test_llmzip_and_transformers_load_the_export(exported):
    from transformers import AutoModelForCausalLM

    out, model, report = exported
    ours = load(out)
    assert _flat(attached_fp8_scales(ours)) == pytest.approx(_flat(report["kv_scales"]), rel=BF16_STEP)
    # transformers 5 + compressed-tensors 0.20 load the weights and leave the KV scales
    # unused (reported as unexpected keys); vLLM is what consumes them.
    theirs, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == [f"model.layers.{i}.self_attn.{x}_scale" for i in range(2) for x in "kv"]
    ids = torch.arange(10, 40)[None]
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    assert ((a - b).norm() / b.norm()).item() < HF_REL_ERR_MAX


def test_server_pool_and_metadata_use_the_calibrated_scales(exported, monkeypatch):
    import llmzip.models
    from llmzip.serve.server import build_engine

    out, _, report = exported
    meta = json.loads((out / "llmzip.json").read_text())
    assert meta["kv_cache"]["dtype"] == "fp8" and meta["calibration"]["samples"] == 4
    # The export carries no tokenizer files (stand-in tokenizer): load the model, keep the stand-in.
    monkeypatch.setattr(llmzip.models, "load_for_eval",
                        lambda path, dtype=None, **kw: (load(path, dtype=dtype, **kw), Tok()))
    engine = build_engine(str(out), max_num_seqs=2, max_model_len=64, kv_dtype="fp8", device="cpu")
    read = [(k.item(), v.item()) for k, v in engine.pool.fp8_scales]
    assert _flat(read) == pytest.approx(_flat(report["kv_scales"]), rel=BF16_STEP)


def test_eval_ppl_reads_kv_through_the_calibrated_scales(exported, monkeypatch):
    from llmzip.eval import perplexity as ppl_mod
    from llmzip.kv_cache import KVCacheConfig, QuantizedKVCache

    out, _, report = exported
    model = load(out)
    used = []
    real = QuantizedKVCache.__init__

    def spy(self, cfg, num_layers=None, scales=None):
        used.append(scales)
        real(self, cfg, num_layers, scales)

    monkeypatch.setattr(QuantizedKVCache, "__init__", spy)
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(1))
    res = ppl_mod.perplexity(model, ids, ctx=64, max_windows=2, kv_cache=KVCacheConfig("fp8"), kv_chunk=16,
                             progress=False)
    assert res.kv_cache.startswith("fp8 calibrated scales")
    assert len(used) == 2 and _flat(used[0]) == pytest.approx(_flat(report["kv_scales"]), rel=BF16_STEP)
