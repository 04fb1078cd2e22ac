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


@dataclass(frozen=True)
class Kernel:
    name: str
    can_implement: Callable[[LayerSpec, torch.device], tuple[bool, str]]
    linear: Callable  # (x, module) -> y
    prepare: Callable | None = None  # (module) -> None: fill module.kernel_cache once, when selected


def _reference_ok(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
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
    return True, "fused dequantize + matmul (split-K for M <= 16)"


def _triton_prepare(module) -> None:
    from . import triton_qmm

    module.kernel_cache["triton"] = triton_qmm.repack(module)


def _triton_linear(x: torch.Tensor, module) -> torch.Tensor:
    from . import triton_qmm

    if "triton" not in module.kernel_cache:
        _triton_prepare(module)
    y = triton_qmm.qmm(x, module.kernel_cache["triton"])
    return y if module.bias is None else y + module.bias.to(y.dtype)


TRITON = Kernel("triton", _triton_ok, _triton_linear, _triton_prepare)


CPU_INT4 = Kernel("cpu_int4", cpu_int4.can_implement, cpu_int4.linear, cpu_int4.prepare)

# First match wins: the fastest kernel first, the reference (accepts everything) last.
KERNELS: list[Kernel] = [TRITON, CPU_INT4, REFERENCE]


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
