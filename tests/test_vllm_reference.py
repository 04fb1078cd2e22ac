"""bench/vllm_side.py's torch reference of vLLM's CPU int4 GEMM (`cpu_gemm_wna16`), used by
`bash bench/test_vllm.sh --reference-wna16` where vLLM's build lacks the op. The layout is rebuilt
here step by step as vLLM's CPUWNA16LinearKernel repacks a compressed-tensors weight: codes [K, N]
packed 8 per int32 along N (code i of a word in bits 4i), then blocks of 16 output channels made
contiguous over K."""

import importlib.util
from pathlib import Path

import pytest
import torch

from llmzip.packing import pack_int32

# Same bf16 weights and products on both sides; only the fp32 summation order may differ.
RTOL, ATOL = 1e-2, 1e-2


def _side():
    path = Path(__file__).resolve().parents[1] / "bench" / "vllm_side.py"
    spec = importlib.util.spec_from_file_location("bench_vllm_side", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pack_along_n(codes: torch.Tensor) -> torch.Tensor:
    """[R, N] codes 0..15 -> [R, N/8] int32, as vLLM's pack_quantized_values_into_int32(dim 1):
    llmzip's own 4-bit packing (eight nibbles per word, LSB-first) of the codes less 8."""
    return pack_int32((codes - 8).to(torch.int8), 4, dim=1)


def _vllm_layout(codes: torch.Tensor) -> torch.Tensor:
    """[K, N] codes -> CPUWNA16's q_weight [N/16, 2K]."""
    k, n = codes.shape
    return _pack_along_n(codes).view(k, n // 16, 2).permute(1, 0, 2).reshape(n // 16, 2 * k).contiguous()


@pytest.mark.parametrize("asymmetric", [False, True])
def test_reference_gemm_matches_the_dense_weights_it_encodes(asymmetric):
    torch.manual_seed(0)
    k, n, group, m = 128, 64, 32, 3
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
    scales = (torch.rand(k // group, n) * 0.1 + 0.01).to(torch.bfloat16)
    zero = torch.randint(0, 16, (k // group, n), dtype=torch.int32) if asymmetric else None
    bias = torch.randn(n).to(torch.bfloat16)
    x = torch.randn(2, m, k).to(torch.bfloat16)

    offset = zero.repeat_interleave(group, 0) if asymmetric else 8
    dense = ((codes - offset).float() * scales.float().repeat_interleave(group, 0)).to(torch.bfloat16)
    expected = (x.float() @ dense.float() + bias.float()).to(torch.bfloat16)

    side = _side()
    out = side.reference_cpu_gemm_wna16(input=x, q_weight=_vllm_layout(codes), scales=scales,
                                        zeros=_pack_along_n(zero) if asymmetric else None, bias=bias,
                                        pack_factor=8, isa_hint="vec")
    assert out.shape == (2, m, n) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    # the codes' order matters: the same words read with the 16-channel blocks undone differ
    wrong = side.reference_cpu_gemm_wna16(input=x, q_weight=_pack_along_n(codes).view(n // 16, 2 * k),
                                          scales=scales, zeros=_pack_along_n(zero) if asymmetric else None,
                                          bias=bias, pack_factor=8, isa_hint="vec")
    assert (wrong.float() - expected.float()).abs().max().item() > 10 * ATOL


def test_the_load_table_reports_only_what_vllms_log_names():
    """bench/vllm_load.vllm_choices: the platform and kernels vLLM's log names, and "-" for a
    platform the log does not name (never an assumed one)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "vllm_load.py"
    spec = importlib.util.spec_from_file_location("bench_vllm_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log = ("INFO [platforms] Automatically detected platform cpu, using CpuPlatform.\n"
           "INFO Using CPUWNA16LinearKernel for mixed-precision linear\n"
           "INFO Using CPUWNA16LinearKernel for mixed-precision linear\n")
    assert module.vllm_choices(log) == {"platform": "CpuPlatform", "kernels": ["CPUWNA16LinearKernel"]}
    assert module.vllm_choices("INFO Loading weights took 0.5 seconds\n") == {"platform": "-", "kernels": []}
