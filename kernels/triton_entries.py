"""Registry entries for the Triton quantized matmul: `triton` (fp16/bf16/fp32 activations)
and `triton_w4a8` (per-token e4m3 activations on FP8 tensor cores).

Why one `triton` entry, not one per Triton kernel (GEMV, split-K tiles, tiles, dequantize +
cuBLAS): nothing about them is chosen at load. The layer's state is the same repacked
layout (`triton_layout.Repacked`) for all of them, and `triton_qmm.qmm` picks the kernel per
call from the number of rows (M bucket), autotuned on CUDA (autotune.py) or by
`triton_layout.default_config` without tuning: a decode step of one row runs the GEMV and
a prefill the dense path, on the same layer. An entry is what is selected once per layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .base import Kernel, LayerSpec
from .triton_layout import DEQUANT_MIN_M, Repacked, repack


@dataclass(frozen=True)
class TritonState:
    repacked: Repacked  # the weight in the kernel layout, on the layer's device


def _interpreted(name: str) -> bool:
    """Triton's CPU interpreter, forced with LLMZIP_KERNEL=name (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LLMZIP_KERNEL") == name


def can_implement(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    from . import triton_qmm

    if triton_qmm.triton is None:
        return False, "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if _interpreted("triton"):
            return True, "Triton interpreter on CPU (forced with LLMZIP_KERNEL=triton; for tests, slow)"
        return False, "Triton runs on CUDA (on CPU only under TRITON_INTERPRET=1 with LLMZIP_KERNEL=triton)"
    if device.type != "cuda":
        return False, f"Triton runs on CUDA, not {device.type}"
    if not 2 <= spec.bits <= 8:
        return False, f"{spec.bits}-bit codes: the kernel reads 2..8-bit codes"
    if spec.activations == "fp8":
        return False, "fp16/bf16 activations only (FP8 activations run on triton_w4a8)"
    return True, "fused dequantize + matmul per M bucket (GEMV, split-K, tiles; dense matmul for prefill)"


def w4a8_can_implement(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    from . import triton_fp8

    if spec.activations != "fp8":
        return False, "FP8 activations only (opt-in: activations='fp8')"
    if triton_fp8.triton is None:
        return False, "triton is not installed (pip install triton)"
    if not (device.type == "cpu" and _interpreted("triton_w4a8")):
        ok, reason = triton_fp8.fp8_supported(device)
        if not ok:
            return False, reason
    if not 2 <= spec.bits <= 5:
        return False, f"{spec.bits}-bit codes: e4m3 holds integer codes exactly up to 5 bits"
    if spec.group_size is None or spec.group_size % 32:
        return False, f"group size {spec.group_size}: W4A8 applies one scale per K tile, groups of 32k"
    if spec.act_order:
        return False, "act-order: groups are not contiguous K tiles (run with fp16 activations)"
    return True, "W4A8: per-token e4m3 activations (fused kernel), e4m3 codes on FP8 tensor cores"


def prepare(module) -> TritonState:
    return TritonState(repack(module))


def linear(x: torch.Tensor, module, state: TritonState) -> torch.Tensor:
    from . import triton_qmm

    y = triton_qmm.qmm(x, state.repacked, activations=module.activations)
    return y if module.bias is None else y + module.bias.to(y.dtype)


def routes(state: TritonState) -> dict[str, str]:
    return {"any": f"per call by rows: GEMV (1 row), split-K tiles (<= 16), tiles, dequantize + dense matmul "
                   f"(>= {DEQUANT_MIN_M} without tuning); autotuned per M bucket on CUDA"}


TRITON = Kernel("triton", can_implement, prepare, linear, routes)
TRITON_W4A8 = Kernel("triton_w4a8", w4a8_can_implement, prepare, linear)
