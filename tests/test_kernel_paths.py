"""The kernel paths the Triton qmm picks per M bucket, and the W4A8 (FP8 activations) path,
against their torch references under Triton's CPU interpreter (TRITON_INTERPRET=1)."""

import pytest
import torch
from helpers import tiny_llama
from test_kernels import layer, rel_err

from llmzip.config import QuantConfig, WeightScheme
from llmzip.kernels import registry, triton_dequant, triton_fp8, triton_qmm
from llmzip.kernels.reference import dense_weight
from llmzip.quant_linear import QuantLinear, set_activations

FP32_TOL = 1e-5  # same inputs, fp32 products: only the summation order differs
HALF_TOL = 4e-3  # the output is rounded to fp16/bf16
LOGIT_TOL = 8e-2  # per-token e4m3 (3 mantissa bits: ~3.6% rms per element) vs fp32, tiny random model


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Outputs and the dense buffers start as NaN: an element a kernel forgets to write fails."""
    monkeypatch.setattr(triton_qmm, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                        device=device, dtype=dtype))


def _workspace_at_rest() -> bool:
    return all(bool((ws == 0).all()) and bool((cnt == 0).all()) for ws, cnt in triton_qmm._WORKSPACE.values())


@pytest.mark.parametrize("config", [triton_qmm.Config(16, 32, 32, 3, reduce="atomic"),
                                    triton_qmm.Config(1, 32, 32, 4, reduce="atomic"),
                                    triton_qmm.Config(32, 32, 64, 2, reduce="atomic")])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M", [1, 5])
def test_split_k_reduced_inside_the_kernel(config, symmetric, M):
    """Partials added into the fp32 workspace, the last K slice writes the output and leaves
    the workspace and its counters at zero for the next call."""
    m = layer(symmetric=symmetric, group=64 if config.block_k == 64 else 32)
    for seed in (1, 2):  # the second call finds the workspace as the first left it
        assert rel_err(m, M, config=config, seed=seed) < 1e-3
        assert _workspace_at_rest()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, HALF_TOL)])
def test_split_k_in_kernel_for_half_activations(dtype, tol):
    m = layer(dtype=dtype)
    assert rel_err(m, 3, dtype=dtype, config=triton_qmm.Config(16, 32, 32, 3, reduce="atomic")) < max(tol, 1e-3)


@pytest.mark.parametrize("bits,symmetric,act_order", [(4, True, None), (4, False, "ragged"), (3, True, "uniform"),
                                                      (8, False, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_buffer_is_the_reference_weight(bits, symmetric, act_order, dtype):
    """The dense path's weight equals the reference dequantization bit for bit (same fp32 math,
    one cast), in the kernel's K order."""
    m = layer(bits=bits, symmetric=symmetric, act_order=act_order, dtype=dtype)
    r = triton_qmm.repack(m)
    out = torch.full((m.in_features, m.out_features), float("nan"), dtype=dtype)
    w = triton_dequant.dequantize(r, dtype, out=out)
    ref = dense_weight(m, dtype).t()
    ref = ref[r.perm] if r.perm is not None else ref
    assert torch.equal(w, ref)


@pytest.mark.parametrize("M", [1, 4, 300])
def test_dense_path_matches_the_reference(M):
    m = layer(symmetric=False, act_order="uniform")
    assert rel_err(m, M, config=triton_qmm.Config(64, 128, 128, path="dequant")) < FP32_TOL


def test_default_config_per_m_bucket():
    r = triton_qmm.repack(layer(group=64))
    cpu = torch.device("cpu")
    paths = {M: triton_qmm.default_config(M, N, K, cpu, r) for M, (N, K) in
             {1: (72, 192), 16: (72, 192), 64: (72, 192), 256: (72, 192), 4096: (72, 192)}.items()}
    assert [paths[M].path for M in (1, 16, 64, 256, 4096)] == ["fused", "fused", "fused", "dequant", "dequant"]
    assert paths[1].block_m == 1
    fp8 = triton_qmm.default_config(1, 72, 192, cpu, r, "fp8")
    assert fp8.block_m == 16 and triton_qmm.tile_scale(r, fp8.block_k)


def test_config_refuses_unknown_paths():
    with pytest.raises(ValueError, match="path one of"):
        triton_qmm.Config(16, 32, 32, path="cublas")


def test_e4m3_quantization_per_token_is_exact():
    """The fused kernel's per-row scale and e4m3 rounding equal torch's float8_e4m3fn cast,
    across magnitudes (subnormals, ties, the 448 maximum) and an all-zero row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 700, generator=g) * torch.logspace(-4, 3, 6)[:, None]
    x[2] = 0
    x[3, :4] = torch.tensor([1e3, -1e3, 0.5e3, 1e-6])
    q, s = triton_fp8.quantize_rows(x, emulate=True)
    q_ref, s_ref = triton_fp8.quantize_rows_reference(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref.float())
    assert q.abs().max().item() == triton_fp8.E4M3_MAX


@pytest.mark.parametrize("config", [triton_qmm.Config(16, 32, 32, 1), triton_qmm.Config(16, 32, 32, 3, reduce="atomic"),
                                    triton_qmm.Config(16, 32, 32, 2), triton_qmm.Config(32, 32, 64, 1, path="dequant")])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M", [1, 7])
def test_w4a8_kernel_matches_its_reference(config, symmetric, M):
    """W4A8: e4m3 activations times exact e4m3 codes, one group scale per K tile, the row
    scale at the end: equal to (e4m3(x) * s_x) @ W^T computed in fp32 by torch."""
    m = layer(symmetric=symmetric, group=64)
    x = torch.randn(M, m.in_features, generator=torch.Generator().manual_seed(M)) * 2
    y = triton_qmm.qmm(x, triton_qmm.repack(m), config, activations="fp8")
    ref = triton_fp8.w4a8_reference(x, dense_weight(m, torch.float32))
    assert ((y - ref).norm() / ref.norm()).item() < FP32_TOL
    assert _workspace_at_rest()


def test_w4a8_refuses_tiles_across_groups():
    with pytest.raises(ValueError, match="K tiles inside one group"):
        triton_qmm.qmm(torch.randn(2, K_), triton_qmm.repack(layer(group=32)), triton_qmm.Config(16, 32, 64),
                       activations="fp8")


K_ = 192


def _spec(**kw):
    base = dict(bits=4, group_size=128, symmetric=True, act_order=False, in_features=256, out_features=256,
                activations="fp8")
    return registry.LayerSpec(**{**base, **kw})


@pytest.mark.parametrize("spec,reason", [
    (_spec(), "FP8 tensor cores are on CUDA"), (_spec(activations="fp16"), "FP8 activations only")])
def test_w4a8_entry_says_why_it_refuses(spec, reason):
    ok, why = registry.TRITON_W4A8.can_implement(spec, torch.device("cpu"))
    assert not ok and reason in why


@pytest.mark.parametrize("spec,reason", [(_spec(bits=8), "5 bits"), (_spec(group_size=None), "group size"),
                                         (_spec(act_order=True), "act-order")])
def test_w4a8_entry_refuses_layouts_it_cannot_run(spec, reason, monkeypatch):
    monkeypatch.setenv("LLMZIP_KERNEL", "triton_w4a8")  # interpreter on CPU: past the device check
    ok, why = registry.TRITON_W4A8.can_implement(spec, torch.device("cpu"))
    assert not ok and reason in why


def _quantized(activations):
    import llmzip

    model, _ = llmzip.quantize(tiny_llama(dtype=torch.float32), QuantConfig(weights=WeightScheme(4, 32)),
                               progress=False)
    set_activations(model, activations)
    return model


def test_fp8_activations_on_cpu_emulate_w4a8_in_the_reference():
    """On CPU, activations='fp8' runs the reference with per-token e4m3 inputs: the logits
    move (the rounding is real) but stay close to the 16-bit ones."""
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = _quantized("fp16")(ids).logits
        model = _quantized("fp8")
        out = model(ids).logits
    names = {m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)}
    assert names == {"reference"}
    err = ((out - base).norm() / base.norm()).item()
    assert 0 < err < LOGIT_TOL


def test_forced_w4a8_kernel_matches_the_cpu_emulation(monkeypatch):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    model = _quantized("fp8")
    with torch.no_grad():
        ref = model(ids).logits
        monkeypatch.setenv("LLMZIP_KERNEL", "triton_w4a8")
        set_activations(model, "fp8")
        out = model(ids).logits
    assert {m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)} == {"triton_w4a8"}
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_load_with_fp8_activations(tmp_path):
    import llmzip
    from llmzip.checkpoint import CheckpointError

    llmzip.quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 32)), output_dir=tmp_path / "q",
                    progress=False)
    model = llmzip.load(tmp_path / "q", activations="fp8")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.activations for m in layers} == {"fp8"} and {m.kernel_name for m in layers} == {"reference"}
    with pytest.raises(CheckpointError, match="activations must be one of"):
        llmzip.load(tmp_path / "q", activations="int8")


def test_fp8_except_keeps_16_bit_inputs_for_the_named_linears(tmp_path):
    """activations "fp8-except=gate_proj,up_proj": those Linears run W4A16, every other one W4A8;
    the logits then lie between fp16's and all-fp8's."""
    import llmzip
    from llmzip.checkpoint import CheckpointError

    llmzip.quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 32)), output_dir=tmp_path / "q",
                    progress=False)
    model = llmzip.load(tmp_path / "q", activations="fp8-except=gate_proj,up_proj")
    modes = {n.rsplit(".", 1)[-1]: m.activations for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert modes == {"q_proj": "fp8", "k_proj": "fp8", "v_proj": "fp8", "o_proj": "fp8", "gate_proj": "fp16",
                     "up_proj": "fp16", "down_proj": "fp8"}
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(ids).logits
        set_activations(model, "fp16")
        base = model(ids).logits
        set_activations(model, "fp8")
        full = model(ids).logits
    err_mixed = ((mixed - base).norm() / base.norm()).item()
    err_full = ((full - base).norm() / base.norm()).item()
    assert 0 < err_mixed < err_full
    with pytest.raises(CheckpointError, match="no quantized Linear is named gate"):
        llmzip.load(tmp_path / "q", activations="fp8-except=gate")
    with pytest.raises(CheckpointError, match="activations must be one of"):
        llmzip.load(tmp_path / "q", activations="fp8-except=")


def test_fp8_activations_refuse_an_unquantized_model(tmp_path):
    from llmzip.models import ModelError, load_for_eval

    tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ModelError, match="applies to quantized layers"):
        load_for_eval(str(tmp_path / "dense"), activations="fp8")


# 2 windows of 512 tokens, |fp8 / fp16 - 1|: measured +2.80% on an AVX2 CPU with the products in fp32 (as
# eval runs them on CPUs without native bf16), and +1.74% with gate_proj and up_proj kept 16-bit; the
# 8 x 2048 bench measures +1.22% and +0.33% on that machine (bench/results/fp8_activations_smollm2.md).
# A broken emulation costs far more.
FP8_PPL_INCREASE = 0.04


@pytest.mark.slow
def test_eval_ppl_cli_with_fp8_activations(smollm2_dir, tmp_path):
    from helpers import last_json, run

    out = tmp_path / "w4"
    assert run("quantize", "smollm2-135m", "--bits", "4", "--group-size", "64", "-o", str(out)).returncode == 0
    res = {}
    mixed = "fp8-except=gate_proj,up_proj"
    for act in ("fp16", "fp8", mixed):
        e = run("eval", "ppl", str(out), "--ctx", "512", "--max-windows", "2", "--activations", act, "--json")
        assert e.returncode == 0, e.stderr
        res[act] = last_json(e.stdout)
    assert res["fp8"]["activations"] == "fp8" and res[mixed]["activations"] == mixed
    cost = {act: res[act]["ppl"] / res["fp16"]["ppl"] - 1 for act in ("fp8", mixed)}
    assert 0 < abs(cost["fp8"]) < FP8_PPL_INCREASE
    assert 0 < cost[mixed] < cost["fp8"]  # the MLP's input in 16 bits costs less than every input in e4m3


def test_autotune_searches_every_path_of_its_m_bucket():
    from llmzip.kernels import autotune

    r = triton_qmm.repack(layer(k=1024, n=256, group=128))
    kinds = {M: {(c.block_m == 1, c.reduce, c.path) for c in autotune.candidates(M, 1024, r)} for M in (1, 16, 64, 256)}
    assert kinds[1] == {(True, "sum", "fused"), (True, "atomic", "fused"), (False, "sum", "fused"),
                        (False, "atomic", "fused")}
    assert (False, "atomic", "fused") in kinds[64] and (True, "sum", "fused") not in kinds[16]
    assert {p for _, _, p in kinds[256]} == {"fused", "dequant"}
    fp8 = autotune.candidates(1, 1024, r, "fp8") + autotune.candidates(256, 1024, r, "fp8")
    assert all(c.block_m > 1 and triton_qmm.tile_scale(r, c.block_k) for c in fp8)
    assert {c.path for c in fp8} == {"fused", "dequant"}


def test_fp8_code_buffer_is_k_major_and_exact():
    m = layer(symmetric=False, group=64)
    r = triton_qmm.repack(m)
    c = triton_dequant.dense_codes(r, emulate=True)
    from llmzip.packing import unpack_int32

    q = unpack_int32(m.weight_packed, 4, m.in_features, dim=1).float()
    z = unpack_int32(m.weight_zero_point, 4, m.out_features, dim=0).float().repeat_interleave(64, 1)
    assert c.stride(0) == 1 and torch.equal(c, (q - z).t())


def test_serve_engine_takes_fp8_activations(tmp_path, monkeypatch):
    import llmzip
    import llmzip.models
    from test_kv_fp8 import Tok

    from llmzip.serve.server import build_engine

    llmzip.quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 32)), output_dir=tmp_path / "q",
                    progress=False)
    monkeypatch.setattr(llmzip.models, "load_for_eval",
                        lambda path, dtype=None, **kw: (llmzip.load(path, dtype=dtype, **kw), Tok()))
    engine = build_engine(str(tmp_path / "q"), max_num_seqs=2, max_model_len=64, kv_dtype="auto", device="cpu",
                          activations="fp8")
    layers = [m for m in engine.model.modules() if isinstance(m, QuantLinear)]
    assert layers and {m.activations for m in layers} == {"fp8"}
