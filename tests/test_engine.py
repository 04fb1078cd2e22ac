"""Serving engine units on a tiny random Llama: continuous batching, chunked prefill,
the paged KV pool, cancellation, backpressure and batched sampling."""

import argparse

import pytest
import torch
from helpers import Tok, collect, greedy, model_without_eos, tiny_llama

from llmzip import QuantConfig, WeightScheme, load, quantize
from llmzip.serve.engine import Engine, EngineConfig, EngineFull, PromptTooLong
from llmzip.serve.kv_pool import KVPool
from llmzip.serve.sampling import SamplingParams, sample

POOL_SQNR_MIN_DB = {"int8": 38.0, "fp8": 25.0}  # SQNR (dB) of K/V read back from a quantized pool
KIVI_SQNR_MIN_DB = {4: 17.0, 2: 5.0}  # by bits, KIVI pool: min/max over 4 tokens (keys) or 4 channels (values)
LEAN_REL_TOL = 1e-5  # lean forward vs the model's own logits, relative to their max: fp32 rounding
DECODED_PER_TOKEN_MAX = 8  # detokenizer work (decoded ids) per output id: a short window, not the whole output


def test_continuous_batching_with_chunked_prefill_equals_generate():
    torch.manual_seed(1)
    model = model_without_eos()
    # 7 requests, at most 3 at once, prompts prefilled 5 tokens per step, 4-token pages:
    # sequences join and leave the batch while others decode, and span many pages.
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=3, max_model_len=128, page=4, prefill_chunk=5))
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 17, 9, 1, 30, 12, 6)]
    lengths = [11, 4, 20, 7, 9, 15, 2]
    runs = [collect(eng, p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    eng.run_until_done()
    for p, n, events in zip(prompts, lengths, runs):
        assert [t for e in events for t in e.tokens] == greedy(model, p, n)
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == n
        assert "".join(e.text for e in events) == Tok().decode(greedy(model, p, n))
    assert len(eng.pool.free) == eng.pool.num_pages - 1  # every page back
    assert eng.stats["prompt_tokens"] == sum(map(len, prompts))


@pytest.mark.parametrize("kv_dtype", ["auto", "int4"])
def test_one_pass_steps_with_decode_rows_and_prompt_chunks_equal_the_models_own_forward(kv_dtype):
    """The lean forward runs a whole step in one pass: decoding rows (1 new token each) and
    prompt chunks of different lengths, grouped by length. Its greedy tokens equal those of
    the model's own forward, which prefills one sequence per pass and decodes in another."""
    torch.manual_seed(2)
    model = model_without_eos()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 19, 11, 19, 3)]
    tokens, groups = {}, []
    for forward in ("lean", "model"):
        eng = Engine(model, Tok(), EngineConfig(max_num_seqs=5, max_model_len=128, page=4, kv_dtype=kv_dtype,
                                                forward=forward))
        if forward == "lean":
            real = eng.runner.lean.__call__
            eng.runner.lean = lambda ids, pos, g, last: groups.append(sorted(x.q for x in g)) or real(ids, pos, g, last)
        runs = [collect(eng, prompts[0], SamplingParams(max_tokens=12, temperature=0))]
        eng.step()
        eng.step()  # the first sequence decodes while the others arrive
        runs += [collect(eng, p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts[1:]]
        eng.run_until_done()
        tokens[forward] = [[t for e in r for t in e.tokens] for r in runs]
        assert all(len(t) == 12 for t in tokens[forward])
    assert tokens["lean"] == tokens["model"]
    assert groups[2] == [1, 3, 11, 19]  # one pass: a decode row and three chunk lengths (two 19s share a group)


def test_abort_frees_pages_and_reports():
    eng = Engine(model_without_eos(), Tok(), EngineConfig(max_num_seqs=2, max_model_len=64, page=4))
    events = []
    sid = eng.submit([1, 2, 3], SamplingParams(max_tokens=50, temperature=0), events.append)
    eng.step()
    eng.step()
    assert eng.load()["kv_pages_used"] == eng.pool.pages_for(53)
    eng.abort(sid)
    eng.step()
    assert events[-1].finish_reason == "abort" and eng.load()["kv_pages_used"] == 0
    assert eng.stats["aborted"] == 1


def test_backpressure_and_limits():
    eng = Engine(model_without_eos(), Tok(), EngineConfig(max_num_seqs=1, max_model_len=32, max_queue=2))
    p = SamplingParams(max_tokens=4)
    eng.submit([1], p, lambda e: None)
    eng.submit([1], p, lambda e: None)
    with pytest.raises(EngineFull):
        eng.submit([1], p, lambda e: None)
    with pytest.raises(PromptTooLong, match="context is 32 tokens"):
        eng.submit(list(range(40)), p, lambda e: None)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        Engine(model_without_eos(), Tok(), EngineConfig(max_model_len=1024))


@pytest.mark.parametrize("kv_dtype, floor_db", list(POOL_SQNR_MIN_DB.items()))
def test_quantized_pool_round_trip(kv_dtype, floor_db):
    torch.manual_seed(0)
    pool = KVPool(1, 8, 2, 64, torch.float32, "cpu", page=4, kv_dtype=kv_dtype)
    pages = pool.allocate(3)
    k, v = torch.randn(12, 2, 64), torch.randn(12, 2, 64) * 3
    slots = torch.tensor(pages).repeat_interleave(4)
    pool.write(0, slots, torch.arange(12) % 4, k, v)
    rk, rv = pool.read(0, torch.tensor([pages]))
    for x, r in ((k, rk), (v, rv)):
        r = r[0].transpose(0, 1)  # [tokens, heads, dim]
        sqnr = 10 * torch.log10(x.pow(2).sum() / (x - r).pow(2).sum())
        assert sqnr > floor_db


@pytest.mark.parametrize("kv_dtype, bits", [("int4", 4), ("int2", 2)])
def test_kivi_pool_reads_full_pages_quantized_and_the_open_page_exact(kv_dtype, bits):
    """Two rows written as one prefill chunk and then token by token: every full page reads
    back exactly what llmzip.kv_cache's KIVI functions give for that page (group = page),
    and the open page reads back bit-exact from the row's residual slot."""
    from llmzip.kv_cache import KVCacheConfig, dequantize_keys, dequantize_values, quantize_keys, quantize_values
    from llmzip.serve.kv_pool import RowSpans

    torch.manual_seed(0)
    page, H, D = 4, 2, 16
    pool = KVPool(1, 12, H, D, torch.float32, "cpu", page=page, kv_dtype=kv_dtype, slots=2)
    tables = [pool.allocate(4), pool.allocate(4)]
    slots = [pool.allocate_slot(), pool.allocate_slot()]
    table = torch.tensor(tables)
    k, v = torch.randn(2, H, 13, D), torch.randn(2, H, 13, D) * 3
    spans = []
    for r in range(2):  # prefill 6 tokens of each row (one and a half pages), one row at a time
        spans.append(RowSpans(table[r:r + 1], table[r:r + 1], [slots[r]], torch.tensor([0]), 6, page, "cpu"))
        pool.write_rows(0, spans[-1], k[r:r + 1, :, :6], v[r:r + 1, :, :6])
    for t in range(6, 13):  # then decode both rows together
        rows = RowSpans(table, table, slots, torch.tensor([t, t]), 1, page, "cpu")
        pool.write_rows(0, rows, k[:, :, t:t + 1], v[:, :, t:t + 1])
    rk, rv = pool.read_rows(0, rows)  # 13 tokens: 3 full pages + 1 open token
    cfg = KVCacheConfig(kv_dtype, residual=0, group=page)
    full = 12
    want_k = dequantize_keys(quantize_keys(k[:, :, :full], cfg), cfg, torch.float32)
    want_v = dequantize_values(quantize_values(v[:, :, :full], cfg), cfg, torch.float32)
    assert torch.equal(rk[:, :, :full], want_k) and torch.equal(rv[:, :, :full], want_v)
    assert torch.equal(rk[:, :, full:13], k[:, :, full:]) and torch.equal(rv[:, :, full:13], v[:, :, full:])
    floor_db = KIVI_SQNR_MIN_DB[bits]
    for x, r in ((k, rk), (v, rv)):
        sqnr = 10 * torch.log10(x[:, :, :full].pow(2).sum() / (x[:, :, :full] - r[:, :, :full]).pow(2).sum())
        assert sqnr > floor_db


def test_kivi_pool_engine_equals_generate_with_the_same_quantized_cache():
    """An int4 pool with 4-token pages decodes, token for token, what model.generate does
    with llmzip.QuantizedKVCache(int4, residual=0, group=4): both quantize a group of 4
    tokens once it is full and read the rest in full precision. Three requests of
    different lengths run at once, joining and leaving the batch."""
    kivi_engine_equals_generate("cpu")


def kivi_engine_equals_generate(device: str):
    from llmzip.kv_cache import KVCacheConfig, QuantizedKVCache, cache_kwarg

    torch.manual_seed(2)
    model = model_without_eos().to(device)
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=2, max_model_len=128, page=4, kv_dtype="int4",
                                            prefill_chunk=64))
    assert eng.pool.kivi and eng.pool.page == 4
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (7, 12, 3)]
    lengths = [14, 9, 11]
    runs = [collect(eng, p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    eng.run_until_done()
    cfg = KVCacheConfig("int4", residual=0, group=4)
    for p, n, events in zip(prompts, lengths, runs):
        out = model.generate(torch.tensor([p], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, **{cache_kwarg(model): QuantizedKVCache(cfg)})
        assert [t for e in events for t in e.tokens] == out[0, len(p):].tolist()
    assert len(eng.pool.free) == eng.pool.num_pages - 1 and len(eng.pool.free_slots) == 2  # all returned


def test_pool_bytes_per_token():
    kw = dict(num_layers=30, num_pages=4, kv_heads=3, head_dim=64, dtype=torch.bfloat16, device="cpu")
    assert KVPool(**kw).bytes_per_token() == 30 * 2 * 3 * 64 * 2
    assert KVPool(**kw, kv_dtype="int8").bytes_per_token() == 30 * (2 * 3 * 64 + 2 * 3 * 3)  # fp16 scale, uint8 zero
    assert KVPool(**kw, kv_dtype="fp8").bytes_per_token() == 30 * 2 * 3 * 64
    # int4, 32-token pages: codes 2 x 3 x 32 B; key scale+min per channel per page, value scale+min per
    # token per 32 channels (fp16): 0.3125x of bf16
    assert KVPool(**kw, page=32, kv_dtype="int4", slots=1).bytes_per_token() == 30 * (2 * 3 * 32 + 3 * 64 * 4 / 32
                                                                                        + 3 * 2 * 4)


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    best = logits.argmax(-1).tolist()
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sample(logits, [SamplingParams(temperature=0)] * 4, [[]] * 4, gens).tokens == best
    assert sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 4, [[]] * 4, gens).tokens == best
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 4, [[]] * 4, gens).tokens == best
    # A seeded row samples the same token whatever else is in the batch.
    row = SamplingParams(temperature=1.0, seed=5)
    alone = sample(logits[:1], [row], [[]], [torch.Generator().manual_seed(5)]).tokens[0]
    mixed = sample(logits[[1, 0]], [SamplingParams(temperature=0), row], [[], []],
                   [torch.Generator(), torch.Generator().manual_seed(5)]).tokens[1]
    assert alone == mixed
    # A large frequency penalty moves greedy off a token already generated.
    pen = SamplingParams(temperature=0, frequency_penalty=2.0)
    flat = torch.zeros(1, 10)
    flat[0, 3] = 1.0
    assert sample(flat, [pen], [[3]], [torch.Generator()]).tokens == [0]
    lp = sample(logits[:1], [SamplingParams(temperature=0, logprobs=2)], [[]], [torch.Generator()]).logprobs[0]
    assert lp[0] == pytest.approx(torch.log_softmax(logits[0], -1).max().item()) and len(lp[1]) == 2


def test_load_casts_every_float_tensor_to_the_asked_dtype(tmp_path):
    quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 64)), output_dir=tmp_path / "q", progress=False)
    m = load(tmp_path / "q", dtype=torch.float32)
    floats = {t.dtype for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()}
    assert floats == {torch.float32}


def test_vllm_hand_off_maps_options_and_explains_when_missing(tmp_path, capsys):
    from llmzip.cli import main
    from llmzip.serve.server import vllm_command

    args = argparse.Namespace(model_dir=str(tmp_path), host="127.0.0.1", port=9000, max_num_seqs=8,
                              max_model_len=1024, kv_cache_dtype="fp8", tensor_parallel_size=2,
                              served_model_name="m", dtype=torch.bfloat16)
    cmd = vllm_command(args)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags == {"--model": str(tmp_path), "--host": "127.0.0.1", "--port": "9000", "--max-num-seqs": "8", "--max-model-len": "1024",
                     "--kv-cache-dtype": "fp8", "--tensor-parallel-size": "2", "--served-model-name": "m",
                     "--dtype": "bfloat16"}
    with pytest.raises(ValueError, match="no int8 KV cache"):
        vllm_command(argparse.Namespace(**{**vars(args), "kv_cache_dtype": "int8"}))
    pytest.importorskip("fastapi")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert main(["serve", str(tmp_path), "--engine", "vllm"]) == 2
        assert "vLLM is not installed" in capsys.readouterr().err


def test_paged_int8_attention_kernel_decodes_like_the_gather_path(monkeypatch):
    """Decode steps reading the int8 pool with the Triton kernel (interpreter on CPU)
    produce the same greedy tokens as dequantize-and-gather + the model's own attention."""
    pytest.importorskip("triton")
    from llmzip.kernels import triton_kv_attention as tk

    calls = []
    real = tk.decode_attention
    monkeypatch.setattr(tk, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(3)
    model = model_without_eos()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 11, 2)]
    tokens = {}
    for attention in ("gather", "kernel"):
        eng = Engine(model, Tok(), EngineConfig(max_num_seqs=3, max_model_len=64, page=4, kv_dtype="int8",
                                                attention=attention))
        assert eng.paged == (attention == "kernel")
        runs = [collect(eng, p, SamplingParams(max_tokens=9, temperature=0)) for p in prompts]
        eng.run_until_done()
        tokens[attention] = [[t for e in r for t in e.tokens] for r in runs]
    assert tokens["kernel"] == tokens["gather"]
    # Every decode step calls it once per layer (2); each sequence needs 8 (its first token comes from prefill).
    assert len(calls) % 2 == 0 and len(calls) >= 2 * 8
    assert model.config._attn_implementation != "llmzip_paged_int8"  # restored after each step


def _tiny(arch: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    if arch == "llama":
        return tiny_llama(dtype=dtype)
    cfg = {"mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch](**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if arch == "qwen2":  # random biases, so that the fused q/k/v bias is exercised
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(lin.bias, std=0.5)
    return model


def _step_logits(eng, prompts):
    """Prefill each prompt alone, then one batched decode step: the logits of both."""
    from llmzip.serve.engine import Sequence

    seqs = []
    for p in prompts:
        s = Sequence(0, p, SamplingParams(), lambda e: None)
        s.pages = eng.pool.allocate(eng.pool.pages_for(len(p) + 1))
        seqs.append(s)
    with torch.inference_mode():
        pre = torch.cat([eng.runner.forward(torch.tensor([s.prompt]), torch.arange(len(s.prompt))[None], [s]) for s in seqs])
        dec = eng.runner.forward(torch.tensor([[7]] * len(seqs)), torch.tensor([[len(s.prompt)] for s in seqs]), seqs)
    return pre.float(), dec.float()


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "w4"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_lean_forward_matches_the_models_own(arch, quantized):
    """serve/lean.py (fused q/k/v and gate/up, one RoPE over q and k, fused RMSNorm) gives the
    model's own logits to fp32 rounding (relative 1e-5), prefill and batched decode, and the
    model's own forward still computes the same function afterwards (its Linears are views)."""
    from llmzip.api import quantize_model

    model = _tiny(arch)
    if quantized:
        quantize_model(model, QuantConfig(weights=WeightScheme(4, 32)), progress=False)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 19, 11)]
    before = _step_logits(Engine(model, Tok(), EngineConfig(forward="model", page=4, max_model_len=128)), prompts)
    lean = Engine(model, Tok(), EngineConfig(forward="lean", page=4, max_model_len=128))
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in lean.lean.layers)
    got = _step_logits(lean, prompts)
    after = _step_logits(Engine(model, Tok(), EngineConfig(forward="model", page=4, max_model_len=128)), prompts)
    for ref, x, y in zip(before, got, after):
        scale = ref.abs().max().item()
        assert (x - ref).abs().max().item() < LEAN_REL_TOL * scale
        assert torch.equal(y, ref)


PREPACK_FP32_TOL = 1e-2  # of the largest logit (seen: up to 1.5e-3, tiny W4 model)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "w4"])
def test_lean_forward_on_prepacked_bf16_linears_gives_the_same_logits(quantized):
    """With prepack (the default), the LM head, and every Linear of an unquantized bf16 model,
    run on prepared copies (kernels/cpu_dense.py); quantized Linears keep their kernel.
    With oneDNN's prepacked bf16 the logits are bit-equal to the same pass on the Linears'
    own weights; with the fp32 copies of CPUs without native bf16, within PREPACK_FP32_TOL
    (the fp32 products are rounded to bf16 once, where a bf16 matmul may sum in another order)."""
    from llmzip.api import quantize_model
    from llmzip.kernels import cpu_dense
    model = _tiny("qwen2", dtype=torch.bfloat16)
    if quantized:
        quantize_model(model, QuantConfig(weights=WeightScheme(4, 32)), progress=False)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 19, 11)]
    cfg = dict(forward="lean", page=4, max_model_len=128)
    plain = Engine(model, Tok(), EngineConfig(prepack=False, **cfg))
    packed = Engine(model, Tok(), EngineConfig(**cfg))
    assert isinstance(packed.lean.lm_head, cpu_dense.PackedLinear)
    assert not isinstance(plain.lean.lm_head, cpu_dense.PackedLinear)
    layer = packed.lean.layers[0]
    assert all(isinstance(m, cpu_dense.PackedLinear) != quantized for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    for x, y in zip(_step_logits(packed, prompts), _step_logits(plain, prompts)):
        if packed.lean.lm_head.mode == "onednn":
            assert torch.equal(x, y)
        else:
            assert (x - y).abs().max().item() <= PREPACK_FP32_TOL * y.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_rms_norm_is_bit_equal_to_the_models_fp32_round_trip(dtype):
    """serve/lean.py's _norm runs torch's rms_norm on bf16/fp16 input; the model's RMSNorm
    normalises in fp32 and casts back. Equal bit for bit, rows 1..130, widths 64..2048."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llmzip.serve.lean import _norm

    g = torch.Generator().manual_seed(0)
    for rows, width in ((1, 576), (8, 576), (130, 576), (5, 64), (3, 2048)):
        mod = LlamaRMSNorm(width, eps=1e-5).to(dtype)
        torch.nn.init.normal_(mod.weight, 1.0, 0.2, generator=g)
        x = (torch.randn(rows, width, generator=g) * 4).to(dtype)
        assert torch.equal(_norm(x, mod), mod(x))


def test_lean_forward_is_not_used_for_other_architectures():
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    phi = AutoModelForCausalLM.from_config(Phi3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                                      num_attention_heads=4, vocab_size=512, pad_token_id=0,
                                                      bos_token_id=1, eos_token_id=2)).eval()
    assert Engine(phi, Tok(), EngineConfig()).lean is None
    with pytest.raises(ValueError, match="lean forward pass does not cover model type 'phi3'"):
        Engine(phi, Tok(), EngineConfig(forward="lean"))


def test_incremental_detokenization_equals_decoding_the_whole_output(smollm2_dir):
    """Engine._text decodes only the tokens since the last character boundary, yet returns
    exactly tokenizer.decode(all tokens) after every token: for text whose characters span
    several byte-level tokens (CJK, emoji), special tokens in the middle, and random ids."""
    import types

    from transformers import AutoTokenizer

    from llmzip.serve.detokenize import Detokenizer
    from llmzip.serve.engine import Sequence

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    decoded = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    eng = types.SimpleNamespace(tokenizer=Counting())
    text = "Grüße aus Zürich! 東京タワーは高い 🌊🚢 naïve café — “quotes” and ∑ x² ≥ 0.\n  indented"
    rand = torch.randint(0, tok.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = tok.encode(text) * 3 + [tok.eos_token_id] + tok.encode(" after EOS 🎉") + rand
    seq = Sequence(0, [1], SamplingParams(), lambda e: None)
    mismatches = 0
    for n in range(1, len(ids) + 1):
        seq.out = ids[:n]
        mismatches += Detokenizer(eng.tokenizer, set(), 0).text(seq) != tok.decode(ids[:n], skip_special_tokens=True)
    assert mismatches == 0
    # Each call decodes a short window twice, not the whole output: sum of decoded lengths
    # is O(tokens), where whole-output decoding would be about len(ids)^2 / 2.
    assert sum(decoded) < DECODED_PER_TOKEN_MAX * len(ids), (sum(decoded), len(ids))


def test_incremental_detokenization_keeps_spaces_a_sentencepiece_decode_strips():
    """A Metaspace decoder (Llama/Mistral SentencePiece tokenizers) drops the leading space
    of a decode's first token: decoding each new token alone would give "Helloworld!"."""
    import types

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from llmzip.serve.detokenize import Detokenizer
    from llmzip.serve.engine import Sequence

    vocab = {"▁Hello": 0, "▁world": 1, "!": 2, "▁a": 3, "b": 4, "<unk>": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eng = types.SimpleNamespace(tokenizer=PreTrainedTokenizerFast(tokenizer_object=t))
    seq = Sequence(0, [1], SamplingParams(), lambda e: None)
    got = []
    for tok in [0, 1, 2, 3, 4, 1, 1, 2]:
        seq.out.append(tok)
        got.append(Detokenizer(eng.tokenizer, set(), 0).text(seq))
    assert got[-1] == "Hello world! ab world world!"
    assert got[:3] == ["Hello", "Hello world", "Hello world!"]
