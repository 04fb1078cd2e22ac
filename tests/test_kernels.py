"""Triton fused dequant-matmul vs the plain-torch reference (CPU: TRITON_INTERPRET=1, set in conftest)."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_llama

from llmzip.config import WeightScheme
from llmzip.kernels import cpu_int4_amx, triton_qmm
from llmzip.kernels.base import Unsupported
from llmzip.kernels.reference import dense_weight
from llmzip.quant_linear import QuantLinear

K, N = 192, 72  # neither is a multiple of the tiles (masking), both divisible by groups 32 and 64


def layer(bits=4, group=32, symmetric=True, act_order=None, k=K, n=N, seed=0, dtype=torch.float32):
    """A QuantLinear with random codes, scales (of either sign when symmetric), zero points
    and (optionally) g_idx.
    act_order: None, "uniform" (a permutation of equal groups, as GPTQ writes) or "ragged"."""
    g = torch.Generator().manual_seed(seed)
    scheme = WeightScheme(bits, group, symmetric)
    n_groups = 1 if group is None else k // group
    q = torch.randint(scheme.qmin, scheme.qmax + 1, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, n_groups, generator=g) * 0.02 + 0.005
    if symmetric:  # symmetric searches store negative scales too (primitives.signed_qparams)
        scale = scale * (torch.randint(0, 2, scale.shape, generator=g) * 2 - 1)
    scale = scale.to(dtype)
    zero = None if symmetric else torch.randint(scheme.qmin, scheme.qmax + 1, (n, n_groups), generator=g,
                                                dtype=torch.int8)
    g_idx = None
    if act_order == "uniform":
        g_idx = torch.argsort(torch.randperm(k, generator=g)) // group
    elif act_order == "ragged":
        g_idx = torch.randint(0, n_groups, (k,), generator=g)
    lin = torch.nn.Linear(k, n, bias=False, dtype=dtype)
    return QuantLinear.from_quantized(lin, q, scale, zero, scheme, g_idx)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element the kernel forgets to write fails the test."""
    monkeypatch.setattr(triton_qmm, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"),
                                                                                        device=device, dtype=dtype))


def rel_err(module, M, dtype=torch.float32, config=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, module.in_features, generator=g).to(dtype)
    y = triton_qmm.qmm(x, triton_qmm.repack(module), config)
    ref = x.float() @ dense_weight(module, dtype).float().t()  # fp32 accumulation of the same inputs
    assert y.dtype == dtype and y.shape == (M, module.out_features)
    return ((y.float() - ref).norm() / ref.norm()).item()


FP32_TOL = 1e-3
BF16_TOL = 4e-3  # the output itself is rounded to bf16 (2^-9 relative)


def _unpack_kernel_layout(r):
    S = triton_qmm.slot_bits(r.bits)
    P = 32 // S
    words = r.qweight.to(torch.int64) & 0xFFFFFFFF
    u = torch.stack([(words >> (i * S)) & ((1 << S) - 1) for i in range(P)], 1).reshape(-1, r.out_features)
    return (u[:r.in_features] - (1 << (r.bits - 1))).t()  # [N, K] signed, in the kernel's K order


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_repack_round_trips_codes(bits):
    from llmzip.packing import unpack_int32

    m = layer(bits=bits, act_order="uniform")
    r = triton_qmm.repack(m)
    q = unpack_int32(m.weight_packed, bits, K, dim=1)
    assert torch.equal(_unpack_kernel_layout(r), q[:, r.perm].long())
    assert r.g_idx is None  # uniform groups: contiguous after sorting, no per-column group lookup


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M", [1, 3])
def test_bits_and_zero_points(bits, symmetric, M):
    assert rel_err(layer(bits=bits, symmetric=symmetric), M=M) < FP32_TOL


@pytest.mark.parametrize("group", [32, 64, None])
@pytest.mark.parametrize("M", [1, 3, 16, 33])
def test_group_sizes_and_rows(group, M):
    assert rel_err(layer(group=group, symmetric=False, seed=M), M=M) < FP32_TOL


@pytest.mark.parametrize("act_order", ["uniform", "ragged"])
@pytest.mark.parametrize("M", [1, 33])
def test_act_order(act_order, M):
    m = layer(act_order=act_order, symmetric=False)
    assert (triton_qmm.repack(m).g_idx is not None) == (act_order == "ragged")
    assert rel_err(m, M=M) < FP32_TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float16, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("M", [3, 33])
def test_half_activations(dtype, tol, M):
    assert rel_err(layer(dtype=dtype), M=M, dtype=dtype) < tol


@pytest.mark.parametrize("split", [1, 2, 5])
def test_split_k_partial_sums(split):
    """K slices that end mid-tile and a last slice shorter than the others."""
    cfg = triton_qmm.Config(16, 32, 32, split)
    assert rel_err(layer(symmetric=False), M=5, config=cfg) < FP32_TOL


@pytest.mark.parametrize("config,tile", [
    (triton_qmm.Config(1, 32, 32, 2), True),    # GEMV, one scale per K tile
    (triton_qmm.Config(16, 32, 32, 3), True),   # tensor-core tile, one scale per K tile
    (triton_qmm.Config(16, 32, 64, 2), False),  # K tile spans two groups: scales per column
])
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_paths_agree_with_the_reference(config, tile, symmetric):
    m = layer(group=32, symmetric=symmetric)
    assert triton_qmm.tile_scale(triton_qmm.repack(m), config.block_k) == tile
    for M in (1, 2):  # the GEMV config runs the tile kernel for M > 1
        assert rel_err(m, M=M, config=config) < FP32_TOL


def test_default_config_picks_the_gemv_kernel_for_one_row():
    r = triton_qmm.repack(layer(group=64))
    assert triton_qmm.default_config(1, N, K, torch.device("cpu"), r).block_m == 1
    assert triton_qmm.default_config(1, N, K, torch.device("cpu"), r).block_k == 64  # inside a group
    assert triton_qmm.default_config(3, N, K, torch.device("cpu"), r).block_m == 16
    ragged = triton_qmm.repack(layer(act_order="ragged"))
    assert triton_qmm.default_config(1, N, K, torch.device("cpu"), ragged).block_m == 16


def test_registry_runs_a_tiny_model_through_triton(monkeypatch):
    """With LLMZIP_KERNEL=triton (interpreter on CPU), every QuantLinear picks the Triton
    kernel and the logits match the reference kernel's."""
    import llmzip
    from llmzip.config import QuantConfig

    model = tiny_llama(dtype=torch.float32)
    qmodel, _ = llmzip.quantize(model, QuantConfig(weights=WeightScheme(4, 32, symmetric=False)), progress=False)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = qmodel(ids).logits
        monkeypatch.setenv("LLMZIP_KERNEL", "triton")
        for m in qmodel.modules():
            if isinstance(m, QuantLinear):
                m.select_kernel(torch.device("cpu"))
        kernels = {m.kernel_name for m in qmodel.modules() if isinstance(m, QuantLinear)}
        out = qmodel(ids).logits
    assert kernels == {"triton"}
    assert ((out - ref).norm() / ref.norm()).item() < FP32_TOL


def test_info_kernels_shows_choice_and_refusals(tmp_path):
    import llmzip
    from llmzip.config import QuantConfig

    llmzip.quantize(tiny_llama(), QuantConfig(weights=WeightScheme(4, 32)), output_dir=tmp_path / "q",
                    progress=False)
    out = subprocess.run([sys.executable, "-m", "llmzip", "info", str(tmp_path / "q"), "--kernels", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    layers = json.loads(out.stdout.strip().splitlines()[-1])["kernels"]["layers"]
    # On CPU the torch int4 kernel takes every layer (all out_features are multiples of 16).
    assert len(layers) == 14 and {v["kernel"] for v in layers.values()} == {"cpu_int4"}
    assert all("CUDA" in v["refused"]["triton"] for v in layers.values())
    assert "triton refused: Triton runs on CUDA" in out.stdout


@pytest.mark.parametrize("group,symmetric,act_order", [(64, True, None), (32, False, None), (None, False, None),
                                                       (64, True, "uniform"), (64, True, "ragged")])
@pytest.mark.parametrize("M", [1, 3, 80, 130])
@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_int4_kernel_matches_reference(group, symmetric, act_order, M, native_bf16, monkeypatch):
    """torch's int4 CPU matmul (kernels/cpu_int4.py) on bf16 activations; from DENSE_FROM
    rows (80, 130) the kernel's own dequantize + matmul (a bf16 matmul, or the fp32 one
    CPUs without native bf16 take), and ragged act-order groups take the reference path
    inside the kernel. The AMX kernel is switched off here (tested below)."""
    from llmzip.kernels import cpu_dense, cpu_int4

    monkeypatch.setattr(cpu_dense, "native_bf16", lambda: native_bf16)
    monkeypatch.setattr(cpu_int4_amx, "available", lambda: False)

    m = layer(group=group, symmetric=symmetric, act_order=act_order, n=80, dtype=torch.bfloat16)
    ok, why = cpu_int4.can_implement(m.spec(), torch.device("cpu"))
    assert ok, why
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
    if act_order == "ragged":  # refused at prepare: the registry binds the reference instead
        with pytest.raises(Unsupported, match="unequal size"):
            cpu_int4.prepare(m)
        y = m(x)
        assert m.kernel_name == "reference" and "unequal size" in m.refused_kernels["cpu_int4"]
    else:
        y = cpu_int4.linear(x, m, cpu_int4.prepare(m))
    ref = x.float() @ dense_weight(m, torch.bfloat16).float().t()
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()).item() < BF16_TOL


@pytest.mark.parametrize("group,symmetric", [(64, True), (32, False), (None, True), (None, False)])
def test_cpu_int4_dense_weight_is_bit_equal_to_the_reference(group, symmetric, monkeypatch):
    """The dense path's dequantization (bytes of the packed words, (u - 8 - z) * s in fp32,
    whole or in blocks of rows) rounds every weight once, exactly as the reference's fp32
    (q - z) * s cast to bf16."""
    from llmzip.kernels import cpu_int4, cpu_int4_dense

    m = layer(group=group, symmetric=symmetric, n=80, dtype=torch.bfloat16)
    state = cpu_int4.prepare(m).dense
    assert state is not None
    assert torch.equal(cpu_int4_dense.dense_weight(m, state, torch.bfloat16), dense_weight(m, torch.bfloat16))
    assert cpu_int4.dense_from(m) <= 80  # so test_cpu_int4_kernel_matches_reference covers the dense path
    monkeypatch.setattr(cpu_int4_dense, "DEQUANT_BLOCK", 7 * m.in_features)  # blocks of 7 rows, the last one short
    assert torch.equal(cpu_int4_dense.dense_weight(m, state, torch.bfloat16), dense_weight(m, torch.bfloat16))


def test_amx_layout_round_trips_and_places_each_code():
    """cpu_int4_amx.pack: column 16 b + w / 2, k = 4 c + 2 h + w % 2 -> byte (b * K/4 + c) * 32 + w, nibble h."""
    n, k = 48, 96
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = cpu_int4_amx.pack(u)
    assert packed.dtype == torch.uint8 and packed.numel() == n * k // 2
    assert torch.equal(cpu_int4_amx.unpack(packed, n, k), u)
    for col, kk in [(0, 0), (17, 6), (47, 95), (31, 33)]:
        b, i = divmod(col, 16)
        c, r = divmod(kk, 4)
        h, j = divmod(r, 2)
        byte = int(packed[(b * k // 4 + c) * 32 + 2 * i + j])
        assert (byte >> (4 * h)) & 15 == int(u[col, kk])


needs_amx = pytest.mark.skipif(not cpu_int4_amx.available(),
                               reason="the CPU (or OS) gives this process no AMX-BF16 tiles")
AMX_REL = 2.0 ** -8  # the output's rounding to bf16
AMX_ABS = 2.0 ** -20  # times sum(|x| |w|): fp32 sums of x * (128 + u), less (128 + off) * sum(x)


@needs_amx
@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (None, True), (None, False)])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
def test_amx_kernel_is_the_fp32_dequantized_matmul_rounded_once(group, symmetric, M):
    """Every output element within bf16 rounding of x @ W^T summed in fp32 (W dequantized in
    fp32), for 1..16 rows (one pass) and more (several passes, the last one partial)."""
    from llmzip.kernels import cpu_int4

    m = layer(group=group, symmetric=symmetric, n=96, dtype=torch.bfloat16)
    state = cpu_int4.prepare(m)
    assert state.amx is not None and state.torch_int4.packed is None
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
    w = dense_weight(m, torch.float32)
    ref = x.float() @ w.t()
    y = cpu_int4.linear(x, m, state)
    assert y.dtype == torch.bfloat16 and y.shape == (M, 96)
    bound = AMX_REL * ref.abs() + AMX_ABS * (x.float().abs() @ w.abs().t())
    assert ((y.float() - ref).abs() <= bound).all()


@needs_amx
def test_amx_rows_do_not_depend_on_each_other():
    """A row's result is the same bits alone or among 40 rows (the engine batches freely)."""
    from llmzip.kernels import cpu_int4

    m = layer(group=64, symmetric=False, n=96, dtype=torch.bfloat16)
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(3)).bfloat16()
    state = cpu_int4.prepare(m)
    together = cpu_int4.linear(x, m, state)
    assert torch.equal(torch.cat([cpu_int4.linear(x[i:i + 1], m, state) for i in range(40)]), together)


@needs_amx
@pytest.mark.parametrize("act_order", [None, "uniform"])
def test_amx_kernel_takes_act_order_and_leaves_fp16_to_torch(act_order):
    from llmzip.kernels import cpu_int4

    m = layer(group=32, symmetric=False, act_order=act_order, n=80, dtype=torch.bfloat16)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(5)).bfloat16()
    ref = x.float() @ dense_weight(m, torch.float32).t()
    state = cpu_int4.prepare(m)
    assert ((cpu_int4.linear(x, m, state).float() - ref).norm() / ref.norm()).item() < BF16_TOL
    assert state.torch_int4.packed is None
    y16 = cpu_int4.linear(x.half(), m, state)  # torch's int4 matmul, its layout built from the AMX one on first use
    assert state.torch_int4.packed is not None
    assert y16.dtype == torch.float16 and ((y16.float() - ref).norm() / ref.norm()).item() < BF16_TOL


def test_amx_kernel_is_off_without_a_compiler_or_when_disabled(monkeypatch):
    try:
        for env, value in (("LLMZIP_NATIVE", "0"), ("CC", "/bin/false")):
            cpu_int4_amx.library.cache_clear()
            cpu_int4_amx.available.cache_clear()
            with monkeypatch.context() as mp:
                mp.setenv(env, value)
                assert cpu_int4_amx.library() is None and not cpu_int4_amx.available()
    finally:
        cpu_int4_amx.library.cache_clear()
        cpu_int4_amx.available.cache_clear()


def test_cpu_int4_runs_float32_through_the_reference():
    from llmzip.kernels import cpu_int4

    m = layer(group=64, n=80, dtype=torch.float32)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu_int4.linear(x, m, cpu_int4.prepare(m)), x @ dense_weight(m, torch.float32).t())


@pytest.mark.parametrize("act_order", [None, "uniform"])
def test_large_weights_dequantize_in_row_blocks_identically(monkeypatch, act_order):
    from llmzip.kernels import reference

    m = layer(group=32, n=80, act_order=act_order, dtype=torch.bfloat16)
    whole = dense_weight(m, torch.bfloat16)
    monkeypatch.setattr(reference, "CHUNK_ELEMS", 1000)  # 80 x 192 weights now go 5 rows at a time
    assert torch.equal(dense_weight(m, torch.bfloat16), whole)


def test_cpu_int4_refuses_what_it_cannot_run():
    from llmzip.kernels import cpu_int4

    assert not cpu_int4.can_implement(layer(bits=3, n=80).spec(), torch.device("cpu"))[0]
    assert "divisible by 16" in cpu_int4.can_implement(layer(n=72).spec(), torch.device("cpu"))[1]
    assert "CPU only" in cpu_int4.can_implement(layer().spec(), torch.device("cuda"))[1]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(49152, 576), (960, 576), (17, 33)])
def test_cpu_dense_prepacked_linear_is_bit_equal_to_f_linear(n, k, bias):
    """kernels/cpu_dense.py, CPUs with native bf16: oneDNN's linear on a prepacked bf16
    weight returns exactly what F.linear returns, for decode-step and prefill row counts
    and odd shapes."""
    from llmzip.kernels import cpu_dense

    lin = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    if not cpu_dense.native_bf16():
        pytest.skip("this CPU has no oneDNN bf16 linear")
    packed = cpu_dense.PackedLinear(lin)
    assert packed.mode == "onednn"
    for m in (1, 8, 17, 130, 512):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        assert torch.equal(packed(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    x3 = torch.randn(2, 3, k).bfloat16()
    assert torch.equal(packed(x3), torch.nn.functional.linear(x3, lin.weight, lin.bias))


BF16_ROUNDING = 2.0**-7  # a bf16 result vs the fp32 one: its rounding, plus a flip where fp32 sums differ in order


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(4096, 576), (17, 33)])
def test_cpu_dense_fp32_copy_rounds_the_fp32_product(n, k, bias):
    """kernels/cpu_dense.py, the copy CPUs without native bf16 use (forced here on any CPU):
    each output is the fp32 product of the bf16 inputs rounded once to bf16, so within
    bf16 rounding of F.linear in fp32, contiguous, in the input's shape; up to BF16_ROWS rows
    run F.linear on the layer's own bf16 weight."""
    from llmzip.kernels import cpu_dense

    lin = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16).requires_grad_(False)
    packed = cpu_dense.PackedLinear(lin, mode="fp32")
    assert packed.mode == "fp32" and packed.packed.dtype == torch.float32
    w32, b32 = lin.weight.float(), None if lin.bias is None else lin.bias.float()
    for m in (1, 8, 17, 130):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        y, ref = packed(x), torch.nn.functional.linear(x.float(), w32, b32)
        assert y.dtype == torch.bfloat16 and y.is_contiguous() and y.shape == (m, n)
        assert ((y.float() - ref).abs() <= ref.abs() * BF16_ROUNDING + 1e-6).all()
    for m in range(1, cpu_dense.BF16_ROWS + 1):
        x1 = torch.randn(m, k).bfloat16()
        assert torch.equal(packed(x1), torch.nn.functional.linear(x1, lin.weight, lin.bias))
    x3 = torch.randn(2, 3, k).bfloat16()
    assert packed(x3).shape == (2, 3, n)
    if not cpu_dense.native_bf16():
        assert cpu_dense.PackedLinear(lin).mode == "fp32"
        with pytest.raises(ValueError, match="no oneDNN bf16 linear"):
            cpu_dense.PackedLinear(lin, mode="onednn")


def test_cpu_dense_prepacks_only_bf16_dense_linears():
    from llmzip.kernels import cpu_dense

    fp32 = torch.nn.Linear(64, 32)
    assert cpu_dense.prepacked(fp32) is fp32
    assert cpu_dense.available(fp32) == (False, "torch.float32 weight: prepacking is for bf16")
    q = layer(group=32, dtype=torch.bfloat16)
    assert cpu_dense.prepacked(q) is q and cpu_dense.available(q)[1] == "not a dense nn.Linear"
    with pytest.raises(ValueError, match="cannot prepack this layer: not a dense nn.Linear"):
        cpu_dense.PackedLinear(q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_products_round_each_half_product_once(dtype, monkeypatch):
    """kernels/cpu_dense.fp32_products on a CPU without native bf16/fp16 matmuls (forced here
    on any CPU): half-precision linears and matmuls return the fp32 product of their inputs
    rounded once to their dtype, exactly; other dtypes and other ops pass through
    untouched; a dtype the CPU multiplies natively is untouched, and a CPU with both native
    (or a GPU device) gets no mode at all."""
    import contextlib

    from llmzip.kernels import cpu_dense

    monkeypatch.setattr(cpu_dense, "native_bf16", lambda: False)
    monkeypatch.setattr(cpu_dense, "native_fp16", lambda: False)
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((2, 5, 33), (17, 33), (17,)))
    with cpu_dense.fp32_products("cpu"):
        y_lin = torch.nn.functional.linear(x, w, b)
        y_mm = torch.mm(x[0], w.t())
        y_at = x @ w.t()
        y_f32 = torch.mm(x[0].float(), w.t().float())
        y_add = x + x  # not a product: untouched
    assert y_lin.dtype == y_mm.dtype == y_at.dtype == dtype and y_f32.dtype == torch.float32
    assert torch.equal(y_lin, torch.nn.functional.linear(x.float(), w.float(), b.float()).to(dtype))
    assert torch.equal(y_mm, (x[0].float() @ w.float().t()).to(dtype))
    assert torch.equal(y_at, (x.float() @ w.float().t()).to(dtype))
    assert torch.equal(y_add, x + x)
    assert isinstance(cpu_dense.fp32_products("meta"), contextlib.nullcontext)
    monkeypatch.setattr(cpu_dense, "native_bf16" if dtype == torch.bfloat16 else "native_fp16", lambda: True)
    with cpu_dense.fp32_products("cpu"):  # still a mode, for the other dtype
        y_native = torch.mm(x[0], w.t())
    assert torch.equal(y_native, torch.mm(x[0], w.t()))
    monkeypatch.setattr(cpu_dense, "native_bf16", lambda: True)
    monkeypatch.setattr(cpu_dense, "native_fp16", lambda: True)
    assert isinstance(cpu_dense.fp32_products("cpu"), contextlib.nullcontext)
