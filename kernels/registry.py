"""Ordered kernel registry.

Each kernel answers `can_implement(spec, device) -> (ok, reason)`. A QuantLinear asks
`select_kernel` once, when it is built or moved, and keeps the answer; the reasons of
the kernels that refused are kept too, so `llmzip info --kernels` can show them.
Faster kernels are inserted ahead of the reference, which accepts every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference


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


def _reference_ok(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    return True, "plain torch: dequantize then matmul, any device"


REFERENCE = Kernel("reference", _reference_ok, reference.linear)

# First match wins. Faster kernels register themselves ahead of the reference.
KERNELS: list[Kernel] = [REFERENCE]


def register(kernel: Kernel, index: int = 0) -> None:
    """Add a kernel; by default it is tried before all existing ones."""
    KERNELS.insert(index, kernel)


def select_kernel(spec: LayerSpec, device: torch.device) -> tuple[Kernel, dict[str, str]]:
    """Return the first kernel that can run `spec` on `device`, and the reasons
    (name -> reason) of the kernels that refused before it."""
    refused: dict[str, str] = {}
    for kernel in KERNELS:
        ok, reason = kernel.can_implement(spec, device)
        if ok:
            return kernel, refused
        refused[kernel.name] = reason
    detail = "; ".join(f"{k}: {r}" for k, r in refused.items())
    raise RuntimeError(f"no kernel can run this layer ({spec}): {detail}")
