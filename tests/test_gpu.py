"""Checks that need a CUDA device (skipped elsewhere; run them all with bench/gpu.sh)."""

import pytest
import torch
from helpers import tiny_llama

from llmzip.algorithms import rtn
from llmzip.config import QuantConfig, WeightScheme
from llmzip.sequential import calibrate_model
from llmzip.surgery import targets

RTN_MISMATCH_MAX = 1e-3  # share of RTN scales (or zeros) that differ, GPU vs CPU; seen on an H100: 1 scale in 4096
SCALE_REL_DIFF_MAX = 2**-7  # a differing RTN scale is one bf16 ulp off at most
RTN_CODES_EQUAL_MIN = 0.999  # share of equal RTN codes, GPU vs CPU
CALIB_REL_ERR_MAX = 1e-2  # W4 calibration (dense and MoE) on CUDA vs CPU, logits
QMM_REL_ERR_MAX = {torch.float16: 2e-3, torch.bfloat16: 4e-3}  # Triton qmm vs the fp32 reference
QMM_PATHS_REL_ERR_MAX = 4e-3  # split-K and dequant qmm paths vs the fp32 reference
MODEL_REL_ERR_MAX = 5e-3  # fp16 W4 tiny model logits, Triton kernel vs reference kernel
DECODE_ATTENTION_REL_ERR_MAX = 1e-4  # Triton decode attention vs its reference
FP8_SCALE_RTOL = 1e-6  # fp8 row scales, Triton vs torch
FP8_TIE_MISMATCH_MAX = 1e-3  # share of e4m3 codes one step apart (x / s rounding ties)
W4A8_REL_ERR_MAX = 2e-3  # W4A8 kernel vs (e4m3(x) * s) @ W^T in fp32
W4A8_MODEL_REL_ERR_MAX = 1e-2  # fp16 W4 tiny model with fp8 activations, Triton vs the CPU emulation

pytestmark = pytest.mark.gpu


def test_rtn_on_cuda_matches_cpu():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)).bfloat16() * 0.02
    scheme = WeightScheme(4, 128, False)
    cpu, gpu = rtn(w, scheme), rtn(w.cuda(), scheme)
    # The fp32 scale arithmetic may round differently on the GPU before the bf16 cast (seen on
    # an H100: 1 scale in 4096 one bf16 ulp apart); codes follow their scale.
    scale_off = (cpu.scale != gpu.scale.cpu()).float().mean().item()
    rel = ((cpu.scale.float() - gpu.scale.cpu().float()).abs() / cpu.scale.float()).max().item()
    assert scale_off < RTN_MISMATCH_MAX and rel <= SCALE_REL_DIFF_MAX
    assert (cpu.zero != gpu.zero.cpu()).float().mean().item() < RTN_MISMATCH_MAX
    assert (cpu.q == gpu.q.cpu()).float().mean().item() > RTN_CODES_EQUAL_MIN


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_calibration_on_cuda_matches_cpu(method):
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    test = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig(method=method, weights=WeightScheme(4, 32))
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama(dtype=torch.float32)
        calibrate_model(model, cfg, ids, targets(model, cfg)[0], device=device, progress=False)
        with torch.no_grad():
            out[device] = model(test).logits
    assert ((out["cuda"] - out["cpu"]).norm() / out["cpu"].norm()).item() < CALIB_REL_ERR_MAX


def test_moe_calibration_on_cuda_matches_cpu():
    from test_moe import _ids, _model

    from llmzip.moe import prepare_experts

    cfg = QuantConfig(method="awq+gptq", weights=WeightScheme(4, 32))
    out, counts = {}, {}
    for device in ("cpu", "cuda"):
        model = _model("qwen3_moe")
        prepare_experts(model)
        report = calibrate_model(model, cfg, _ids(), targets(model, cfg)[0], device=device, progress=False)
        counts[device] = report["blocks"][0]["expert_tokens"]
        with torch.no_grad():
            out[device] = model(_ids()).logits
    assert counts["cuda"] == counts["cpu"]
    assert ((out["cuda"] - out["cpu"]).norm() / out["cpu"].norm()).item() < CALIB_REL_ERR_MAX


@pytest.mark.parametrize("bits,group,symmetric,act_order", [
    (4, 32, True, None), (4, 64, False, "uniform"), (3, 32, True, "ragged"), (8, None, False, None), (2, 32, True, None)])
@pytest.mark.parametrize("M", [1, 3, 16, 33, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_on_cuda_matches_reference(bits, group, symmetric, act_order, M, dtype, monkeypatch):
    """The CPU interpreter checks of tests/test_kernels.py, compiled for the GPU."""
    from test_kernels import layer

    from llmzip.kernels import triton_qmm
    from llmzip.kernels.reference import dense_weight

    monkeypatch.setattr(triton_qmm, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                        device=device, dtype=dtype))
    m = layer(bits=bits, group=group, symmetric=symmetric, act_order=act_order, k=512, n=200, dtype=dtype).cuda()
    x = torch.randn(M, 512, device="cuda", dtype=dtype)
    y = triton_qmm.qmm(x, triton_qmm.repack(m))
    ref = x.float() @ dense_weight(m, dtype).float().t()
    tol = QMM_REL_ERR_MAX[dtype]
    assert torch.isfinite(y).all() and ((y.float() - ref).norm() / ref.norm()).item() < tol


def test_cuda_model_selects_triton_and_matches_reference(monkeypatch):
    import llmzip
    from llmzip.quant_linear import QuantLinear

    model, _ = llmzip.quantize(tiny_llama(dtype=torch.float16), QuantConfig(weights=WeightScheme(4, 32)),
                               progress=False)
    model = model.cuda()
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    with torch.no_grad():
        out = model(ids).logits.float()
        kernels = {m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)}
        monkeypatch.setenv("LLMZIP_KERNEL", "reference")
        model = model.cpu().cuda()  # moved: kernels are chosen again
        ref = model(ids).logits.float()
    assert kernels == {"triton"}
    assert ((out - ref).norm() / ref.norm()).item() < MODEL_REL_ERR_MAX


@pytest.mark.parametrize("lengths", [[5, 1, 13], [300, 17]])
def test_decode_attention_kernel_on_cuda(lengths):
    from test_kv_attention import filled_pool

    from llmzip.kernels import triton_kv_attention as tk

    pool, table = filled_pool(lengths, hkv=2, d=64, page=16)
    q = torch.randn(len(lengths), 8, 64, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor(lengths)
    ref = tk.decode_attention_reference(q, pool.k[0], pool.kp[0], pool.v[0], pool.vp[0], table, lens)
    dev = [t.cuda() for t in (q, pool.k[0], pool.v[0], table, lens)]
    kp, vp = tuple(t.cuda() for t in pool.kp[0]), tuple(t.cuda() for t in pool.vp[0])
    out = tk.decode_attention(dev[0], dev[1], kp, dev[2], vp, dev[3], dev[4]).cpu()
    assert ((out - ref).norm() / ref.norm()).item() < DECODE_ATTENTION_REL_ERR_MAX


def test_engine_on_cuda_equals_generate():
    """Continuous batching with chunked prefill on CUDA (fp32, bf16-free) gives generate's greedy tokens."""
    from helpers import Tok, collect, greedy, model_without_eos

    from llmzip.serve.engine import Engine, EngineConfig
    from llmzip.serve.sampling import SamplingParams

    torch.manual_seed(1)
    model = model_without_eos().cuda()
    eng = Engine(model, Tok(), EngineConfig(max_num_seqs=3, max_model_len=128, page=4, prefill_chunk=5))
    assert eng.device.type == "cuda"
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 17, 9, 1, 30, 12, 6)]
    lengths = [11, 4, 20, 7, 9, 15, 2]
    runs = [collect(eng, p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    eng.run_until_done()
    model_cpu = model.cpu()
    for p, n, events in zip(prompts, lengths, runs):
        assert [t for e in events for t in e.tokens] == greedy(model_cpu, p, n)
    assert len(eng.pool.free) == eng.pool.num_pages - 1


def test_engine_int4_pool_on_cuda_equals_generate_with_the_same_quantized_cache():
    from test_engine import kivi_engine_equals_generate

    kivi_engine_equals_generate("cuda")


def test_engine_w4_int8_pool_on_cuda_kernels_match_gather():
    """A W4 model (Triton qmm) with the int8 pool on CUDA: the paged attention kernel (chosen
    automatically there) decodes the same greedy tokens as dequantize-and-gather."""
    import llmzip
    from helpers import Tok, collect, model_without_eos

    from llmzip.quant_linear import QuantLinear
    from llmzip.serve.engine import Engine, EngineConfig
    from llmzip.serve.sampling import SamplingParams

    torch.manual_seed(3)
    model, _ = llmzip.quantize(model_without_eos(), QuantConfig(weights=WeightScheme(4, 32)), progress=False)
    model = model.cuda()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 11, 2, 40)]
    tokens = {}
    for attention in ("gather", "auto"):
        eng = Engine(model, Tok(), EngineConfig(max_num_seqs=4, max_model_len=96, page=16, kv_dtype="int8",
                                                attention=attention))
        assert eng.paged == (attention == "auto")
        runs = [collect(eng, p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts]
        eng.run_until_done()
        tokens[attention] = [[t for e in r for t in e.tokens] for r in runs]
    assert {m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)} == {"triton"}
    assert tokens["auto"] == tokens["gather"]


@pytest.mark.parametrize("config", [None, "tile-atomic", "gemv-atomic", "dense"])
@pytest.mark.parametrize("M", [1, 5, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qmm_paths_on_cuda_match_reference(config, M, dtype, monkeypatch):
    """Split-K reduced inside the kernel (fp32 atomics, last slice stores) and the dense path
    (dequantize into a buffer, then cuBLAS), compiled for the GPU; the workspace is left at zero."""
    from test_kernels import layer

    from llmzip.kernels import triton_qmm
    from llmzip.kernels.reference import dense_weight

    monkeypatch.setattr(triton_qmm, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                        device=device, dtype=dtype))
    cfg = {None: None, "tile-atomic": triton_qmm.Config(16, 64, 64, 4, reduce="atomic"),
           "gemv-atomic": triton_qmm.Config(1, 128, 64, 4, reduce="atomic"),
           "dense": triton_qmm.Config(64, 128, 128, path="dequant")}[config]
    m = layer(bits=4, group=64, symmetric=False, k=1024, n=200, dtype=dtype).cuda()
    r = triton_qmm.repack(m)
    for seed in (0, 1):
        x = torch.randn(M, 1024, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(seed))
        y = triton_qmm.qmm(x, r, cfg)
        ref = x.float() @ dense_weight(m, dtype).float().t()
        assert torch.isfinite(y).all() and ((y.float() - ref).norm() / ref.norm()).item() < QMM_PATHS_REL_ERR_MAX
    for ws, cnt in triton_qmm._WORKSPACE.values():
        assert (ws == 0).all() and (cnt == 0).all()


def test_fp8_row_quantization_on_cuda_equals_torch():
    from llmzip.kernels import triton_fp8

    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16) * 3
    q, s = triton_fp8.quantize_rows(x)
    q_ref, s_ref = triton_fp8.quantize_rows_reference(x)
    assert torch.allclose(s, s_ref, rtol=FP8_SCALE_RTOL, atol=0)
    # x / s may round one fp32 ulp differently from torch's division: allow rare one-step e4m3 ties
    assert (q.float() != q_ref.float()).float().mean().item() < FP8_TIE_MISMATCH_MAX


@pytest.mark.parametrize("M", [1, 16, 300])
@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_w4a8_on_cuda_matches_its_reference(M, path):
    """W4A8 on the FP8 tensor cores against (e4m3(x) * s) @ W^T in fp32."""
    from test_kernels import layer

    from llmzip.kernels import triton_fp8, triton_qmm
    from llmzip.kernels.reference import dense_weight

    m = layer(bits=4, group=128, symmetric=True, k=1024, n=256, dtype=torch.float16).cuda()
    x = torch.randn(M, 1024, device="cuda", dtype=torch.float16)
    cfg = triton_qmm.Config(16 if M < 64 else 64, 64, 128, 1 if M > 16 else 4, 4, 3, "atomic", path)
    y = triton_qmm.qmm(x, triton_qmm.repack(m), cfg, activations="fp8")
    ref = triton_fp8.w4a8_reference(x.float(), dense_weight(m, torch.float32))
    assert ((y.float() - ref).norm() / ref.norm()).item() < W4A8_REL_ERR_MAX


def test_cuda_model_with_fp8_activations_runs_w4a8_like_the_cpu_emulation(monkeypatch):
    import llmzip
    from llmzip.quant_linear import QuantLinear, set_activations

    model, _ = llmzip.quantize(tiny_llama(dtype=torch.float16), QuantConfig(weights=WeightScheme(4, 32)),
                               progress=False)
    set_activations(model, "fp8")
    model = model.cuda()
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    with torch.no_grad():
        out = model(ids).logits.float()
        kernels = {m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)}
        monkeypatch.setenv("LLMZIP_KERNEL", "reference")
        model = model.cpu().cuda()
        ref = model(ids).logits.float()
    assert kernels == {"triton_w4a8"}
    assert ((out - ref).norm() / ref.norm()).item() < W4A8_MODEL_REL_ERR_MAX
