"""Ordered kernel registry.

Each kernel answers `can_implement(spec, device) -> (ok, reason)`. A QuantLinear asks
`select_kernel` once, when it is built or moved, and keeps the answer; the reasons of
the kernels that refused are kept too, so `llmzip info --kernels` can show them.
Faster kernels are inserted ahead of the reference, which accepts every layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import cpu_int4, reference


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel needs to know about a quantized layer."""

    bits: int
    group_size: int | None
    symmetric: bool
    act_order: bool
    in_features: int
    out_features: int
    activations: str = "fp16"  # "fp8": activations quantized per token to e4m3 (W4A8, opt-in)


@dataclass(frozen=True)
class Kernel:
    name: str
    can_implement: Callable[[LayerSpec, torch.device], tuple[bool, str]]
    linear: Callable  # (x, module) -> y
    prepare: Callable | None = None  # (module) -> None: fill module.kernel_cache once, when selected


def _reference_ok(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    if spec.activations == "fp8":
        return True, "plain torch: per-token e4m3 activations emulated, dequantize then matmul, any device"
    return True, "plain torch: dequantize then matmul, any device"


REFERENCE = Kernel("reference", _reference_ok, reference.linear)


def _triton_ok(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    from . import triton_qmm

    if triton_qmm.triton is None:
        return False, "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LLMZIP_KERNEL") == "triton":
            return True, "Triton interpreter on CPU (forced with LLMZIP_KERNEL=triton; for tests, slow)"
        return False, "Triton runs on CUDA (on CPU only under TRITON_INTERPRET=1 with LLMZIP_KERNEL=triton)"
    if device.type != "cuda":
        return False, f"Triton runs on CUDA, not {device.type}"
    if not 2 <= spec.bits <= 8:
        return False, f"{spec.bits}-bit codes: the kernel reads 2..8-bit codes"
    if spec.activations == "fp8":
        return False, "fp16/bf16 activations only (FP8 activations run on triton_w4a8)"
    return True, "fused dequantize + matmul per M bucket (GEMV, split-K, tiles; dense matmul for prefill)"


def _triton_prepare(module) -> None:
    from . import triton_qmm

    module.kernel_cache["triton"] = triton_qmm.repack(module)


def _triton_linear(x: torch.Tensor, module) -> torch.Tensor:
    from . import triton_qmm

    if "triton" not in module.kernel_cache:
        _triton_prepare(module)
    y = triton_qmm.qmm(x, module.kernel_cache["triton"], activations=module.spec().activations)
    return y if module.bias is None else y + module.bias.to(y.dtype)


TRITON = Kernel("triton", _triton_ok, _triton_linear, _triton_prepare)


def _w4a8_ok(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    from . import triton_fp8

    if spec.activations != "fp8":
        return False, "FP8 activations only (opt-in: activations='fp8')"
    if triton_fp8.triton is None:
        return False, "triton is not installed (pip install triton)"
    if not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
            and os.environ.get("LLMZIP_KERNEL") == "triton_w4a8"):
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


TRITON_W4A8 = Kernel("triton_w4a8", _w4a8_ok, _triton_linear, _triton_prepare)


CPU_INT4 = Kernel("cpu_int4", cpu_int4.can_implement, cpu_int4.linear, cpu_int4.prepare)

# First match wins: the fastest kernel first, the reference (accepts everything) last.
KERNELS: list[Kernel] = [TRITON_W4A8, TRITON, CPU_INT4, REFERENCE]


def register(kernel: Kernel, index: int = 0) -> None:
    """Add a kernel; by default it is tried before all existing ones."""
    KERNELS.insert(index, kernel)


def select_kernel(spec: LayerSpec, device: torch.device) -> tuple[Kernel, dict[str, str]]:
    """Return the first kernel that can run `spec` on `device`, and the reasons
    (name -> reason) of the kernels that refused before it. $LLMZIP_KERNEL=NAME tries
    that kernel first (e.g. `reference` to rule a fast kernel out when debugging)."""
    refused: dict[str, str] = {}
    forced = os.environ.get("LLMZIP_KERNEL")
    order = sorted(KERNELS, key=lambda k: k.name != forced) if forced else KERNELS
    for kernel in order:
        ok, reason = kernel.can_implement(spec, device)
        if ok:
            return kernel, refused
        refused[kernel.name] = reason
    detail = "; ".join(f"{k}: {r}" for k, r in refused.items())
    raise RuntimeError(f"no kernel can run this layer ({spec}): {detail}")
