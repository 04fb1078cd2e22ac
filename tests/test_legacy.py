"""Import of GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM) checkpoints, and `llmzip convert`.

Checkpoints are written by tests/legacy_formats.py from the formats' definitions; every
test compares against the dense fp16 model those codes dequantize to.
"""

import json

import pytest
import torch
from helpers import tiny_llama
from legacy_formats import write_legacy

from llmzip import load
from llmzip.checkpoint import CheckpointError
from llmzip.cli import main
from llmzip.convert import convert
from llmzip.kernels.reference import dense_weight
from llmzip.legacy import AWQ_ORDER, AWQ_REVERSE
from llmzip.quant_linear import QuantLinear

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
# Same fp16 weights through the same F.linear (reference kernel): logits are equal.
LOGIT_MAX_ABS_DIFF = 0.0

CASES = {
    "gptq-w4g32-sym": dict(method="gptq", bits=4, group=32, sym=True),
    "gptq-w4g32-asym": dict(method="gptq", bits=4, group=32),
    "gptq-w3g32-asym": dict(method="gptq", bits=3, group=32),
    "gptq-w8-channel-sym": dict(method="gptq", bits=8, group=-1, sym=True),
    "gptq-w2g64-asym": dict(method="gptq", bits=2, group=64),
    "gptq-w4g32-desc-act": dict(method="gptq", bits=4, group=32, desc_act=True),
    "gptq-w4g32-sym-desc-act": dict(method="gptq", bits=4, group=32, sym=True, desc_act=True),
    "gptq_v2-w4g32-asym": dict(method="gptq", bits=4, group=32, v2=True),
    "awq-w4g32": dict(method="awq", bits=4, group=32),
    "awq-w4g64": dict(method="awq", bits=4, group=64),
}


def _make(tmp_path, case, **model_kw):
    ref_model = tiny_llama(dtype=torch.float16, **model_kw)
    ref = write_legacy(ref_model, tmp_path / case, **CASES[case])
    return ref_model, ref, tmp_path / case


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_awq_order_is_autoawqs():
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert AWQ_REVERSE == (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ's AWQ_REVERSE_ORDER


@pytest.mark.parametrize("case", list(CASES))
def test_import_is_exact(tmp_path, case, reference_kernel):
    ref_model, ref, path = _make(tmp_path, case)
    model = load(path)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant) == set(ref) and len(quant) == 14
    for name, m in quant.items():
        assert torch.equal(dense_weight(m, torch.float16), ref[name]), name
    first = next(iter(quant.values()))
    assert first.scheme.symmetric == CASES[case].get("sym", False)
    assert first.act_order == CASES[case].get("desc_act", False)
    assert (_logits(model) - _logits(ref_model)).abs().max().item() <= LOGIT_MAX_ABS_DIFF


def test_import_with_bias_and_stray_zero_bias(tmp_path, reference_kernel):
    """Qwen2 keeps q/k/v biases; GPTQ exporters may also store an all-zero bias on
    Linears that have none (dropped), but a non-zero one is refused."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    for m in ref_model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.normal_()
    write_legacy(ref_model, tmp_path / "q", "gptq", 4, 32)
    f = tmp_path / "q" / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.mlp.down_proj.bias"] = torch.zeros(128, dtype=torch.float16)
    save_file(state, f)
    assert (_logits(load(tmp_path / "q")) - _logits(ref_model)).abs().max().item() <= LOGIT_MAX_ABS_DIFF
    state["model.layers.0.mlp.down_proj.bias"][0] = 1.0
    save_file(state, f)
    with pytest.raises(CheckpointError, match="non-zero bias"):
        load(tmp_path / "q")


def test_gptq_v1_zero_overflow_is_refused(tmp_path):
    """GPTQ v1 stores zero - 1: a zero of 0 reads back as 16, which 4 bits cannot hold."""
    from safetensors.torch import load_file, save_file

    _, _, path = _make(tmp_path, "gptq-w4g32-asym")
    state = load_file(path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.qzeros"][0, 0] |= 0xF  # stored 15 -> zero 16
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="zero point of 16 needs 5 bits"):
        load(path)


@pytest.mark.parametrize("qc,message", [
    ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"bits": 3}, "AWQ bits=3 is not supported"),
])
def test_unsupported_awq_variants_are_named(tmp_path, qc, message, capsys):
    _, _, path = _make(tmp_path, "awq-w4g32")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(qc)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load(path)
    assert main(["convert", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["gptq-w4g32-sym", "gptq-w3g32-asym", "gptq-w4g32-desc-act", "awq-w4g32"])
def test_convert_is_bit_exact(tmp_path, case):
    _, ref, path = _make(tmp_path, case)
    assert main(["convert", str(path), "-o", str(tmp_path / "ct")]) == 0
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights.get("actorder") == ("group" if CASES[case].get("desc_act") else None)
    assert weights["symmetric"] == CASES[case].get("sym", False)
    converted = load(tmp_path / "ct")
    quant = {n: m for n, m in converted.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant) == set(ref)
    for name, m in quant.items():
        assert m.weight_scale.dtype == torch.float16
        assert torch.equal(dense_weight(m, torch.float16), ref[name]), name
    meta = json.loads((tmp_path / "ct" / "llmzip.json").read_text())
    assert meta["method"] == f"convert:{CASES[case]['method']}"


def test_converted_symmetric_gptq_loads_in_transformers(tmp_path, reference_kernel):
    from transformers import AutoModelForCausalLM

    ref_model, _, path = _make(tmp_path, "gptq-w4g32-sym")
    convert(path, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16)
    ref = _logits(ref_model)
    assert ((_logits(hf) - ref).norm() / ref.norm()).item() < HF_REL_TOL


HF_REL_TOL = 1e-3  # compressed-tensors decompresses to the same fp16 weights; kernels may differ in order


def test_convert_refuses_compressed_tensors_input(tmp_path, capsys):
    from llmzip import QuantConfig, WeightScheme, quantize

    quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 32)), output_dir=tmp_path / "q", progress=False)
    assert main(["convert", str(tmp_path / "q"), "-o", str(tmp_path / "out")]) == 2
    assert "already compressed-tensors" in capsys.readouterr().err


def test_info_reports_legacy_bits_per_weight(tmp_path):
    from llmzip.info import size_report

    _make(tmp_path, "awq-w4g32")
    # 4-bit codes + an fp16 scale and a 4-bit zero per 32 weights = 4 + 16/32 + 4/32
    assert size_report(tmp_path / "awq-w4g32")["bits_per_weight"] == pytest.approx(4.625, abs=1e-3)


PPL_REL_TOL = 1e-3  # the same fp16 weights; only the matmul kernels differ (CPU int4 vs dense)


@pytest.mark.slow
def test_smollm2_gptq_and_awq_through_the_cli(smollm2_dir, tmp_path):
    """eval ppl and eval kld read a GPTQ and an AWQ SmolLM2 as they read its dense fp16
    reference; convert's output gives the same perplexity."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "llmzip", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for method in ("gptq", "awq"):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float16)
        write_legacy(model, tmp_path / method, method, 4, 64, desc_act=method == "gptq")
        tok.save_pretrained(tmp_path / method)
        model.save_pretrained(tmp_path / f"{method}-dense")  # the dense fp16 reference
        tok.save_pretrained(tmp_path / f"{method}-dense")
        convert(tmp_path / method, tmp_path / f"{method}-ct")
        ppl = {k: cli("eval", "ppl", str(tmp_path / k), "--max-windows", "1", "--ctx", "512", "--json")["ppl"]
               for k in (method, f"{method}-dense", f"{method}-ct")}
        assert ppl[method] == pytest.approx(ppl[f"{method}-dense"], rel=PPL_REL_TOL)
        assert ppl[f"{method}-ct"] == ppl[method]
        kld = cli("eval", "kld", str(tmp_path / f"{method}-dense"), str(tmp_path / method), "--max-windows", "1",
                  "--ctx", "512", "--json")
        assert kld["mean_kld"] < KLD_MAX and kld["top1_agreement"] > TOP1_MIN


KLD_MAX = 1e-3  # legacy checkpoint vs its own dense weights: kernel rounding only
TOP1_MIN = 0.99


class _Tok:
    """Enough of a tokenizer for the serving engine: ids -> text, no EOS."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("case", ["gptq-w4g32-desc-act", "awq-w4g32"])
def test_serve_engine_runs_legacy_checkpoints(tmp_path, case):
    """`llmzip serve` loads through the same llmzip.load; its engine's greedy tokens equal generate's."""
    from llmzip.serve.engine import Engine, EngineConfig
    from llmzip.serve.sampling import SamplingParams

    _, _, path = _make(tmp_path, case)
    model = load(path, dtype=torch.float32)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    prompt, n = list(range(5, 17)), 8
    want = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    engine, events = Engine(model, _Tok(), EngineConfig(max_num_seqs=2, max_model_len=64)), []
    engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0), events.append)
    engine.run_until_done()
    assert [t for e in events for t in e.tokens] == want
