"""Peer W4 g128 matmuls on CUDA for bench/kernels_gpu.py, built from the same codes and scales.

Each builder takes int8 codes q [N, K] (-8..7) and fp16 scales [N, K / 128] and returns a
callable x -> y (or raises ImportError / RuntimeError, which the benchmark records):
- tinygemm: torch's `_weight_int4pack_mm` (bf16 activations; the int4 kernel torchao and
  gpt-fast use), with W = (u - 8) * scale + 0, u = q + 8;
- gemlite 0.6 (Triton; HQQ format W = (u - 8) * scale): published as an sdist only, so its
  package folder is carried and put on PYTHONPATH (bench/gpu.sh); on a GPU it has no tuned
  configs for (an H200), the H100 configs are loaded;
- fp8 cuBLAS (`torch._scaled_mm`, per-token x per-channel scales, e4m3): not a W4 kernel, the
  FP8 tensor-core ceiling the W4A8 path is measured against (activation quantization not timed;
  rows padded to 16, bf16 output as row-wise scaling asks).
"""

from __future__ import annotations

from pathlib import Path

import torch

GROUP = 128


def tinygemm(q: torch.Tensor, scales: torch.Tensor):
    N, K = q.shape
    u = (q.to(torch.int32) + 8).to(torch.uint8)
    table = torch.stack([scales.t().to(torch.bfloat16), torch.zeros_like(scales.t(), dtype=torch.bfloat16)], -1)
    table = table.contiguous()  # [K / 128, N, 2]: scale, zero
    packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), 8)

    def run(x):
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, GROUP, table)

    return run


_GEMLITE_READY = False


def gemlite(q: torch.Tensor, scales: torch.Tensor):
    global _GEMLITE_READY
    import gemlite as gl  # noqa: PLC0415 - optional peer, carried on PYTHONPATH
    from gemlite import DType, GemLiteLinear

    if not _GEMLITE_READY:
        name = torch.cuda.get_device_name().lower()
        if "h200" in name:  # gemlite ships no H200 configs: the H100's
            gl.reset_config()
            gl.load_config(str(Path(gl.__file__).parent / "configs" / "h100.json"))
        _GEMLITE_READY = True
    N, K = q.shape
    lin = GemLiteLinear(4, group_size=GROUP, in_features=K, out_features=N, input_dtype=DType.FP16,
                        output_dtype=DType.FP16)
    lin.pack((q.to(torch.int16) + 8).to(torch.uint8), scales.to(torch.float16), 8, None)
    return lin


def fp8_cublas(q: torch.Tensor, scales: torch.Tensor):
    """e4m3 weight with one scale per output channel; x quantized outside the timed call."""
    w = q.float() * scales.float().repeat_interleave(GROUP, 1)
    ws = (w.abs().amax(1) / 448).clamp_min(1e-12)
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    cache = {}

    def run(x):
        key = x.data_ptr()
        if key not in cache:  # rows padded to 16 (cuBLASLt's FP8 minimum), output rows sliced back
            rows = max(16, -(-x.shape[0] // 16) * 16)
            xp = torch.zeros(rows, x.shape[1], device=x.device, dtype=torch.float32)
            xp[: x.shape[0]] = x.float()
            xs = (xp.abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
            cache[key] = ((xp / xs).to(torch.float8_e4m3fn), xs)
        xq, xs = cache[key]
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :].contiguous(), out_dtype=torch.bfloat16)
        return y[: x.shape[0]]

    return run


PEERS = {"tinygemm": tinygemm, "gemlite": gemlite, "fp8_cublas": fp8_cublas}
