"""What every kernel entry and every layer that runs one share: the layer's description
(`LayerSpec`), a registry entry (`Kernel`) and the binding a layer holds (`KernelLayer`).

A kernel entry is three functions:
- `can_implement(spec, device) -> (ok, reason)`: from the layer's scheme and shape alone;
- `prepare(layer) -> state`: builds, once, what the kernel derives from the layer's tensors
  (a repacked layout, torch's int4 packing, ...) as a typed object (a dataclass per kernel),
  or raises `Unsupported` when the tensors themselves rule the kernel out (act-order groups
  of unequal size);
- `linear(x, layer, state) -> y`: y = x @ W^T + b.
`routes(state) -> {activation dtype: description}` (optional) says which variant runs per call,
for kernels that choose one by the number of rows (`llmzip info --kernels` shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


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


class Unsupported(Exception):
    """Raised by a kernel's `prepare` when the layer's tensors rule the kernel out; the
    registry then tries the next kernel and keeps the message as the reason."""


@dataclass(frozen=True)
class Kernel:
    name: str
    can_implement: Callable[[LayerSpec, torch.device], tuple[bool, str]]
    prepare: Callable[[Any], Any]  # (layer) -> the kernel's state
    linear: Callable[[torch.Tensor, Any, Any], torch.Tensor]  # (x, layer, state) -> y
    routes: Callable[[Any], dict[str, str]] | None = None  # (state) -> {dtype: what runs, by rows}


class KernelLayer:
    """Mixin for a layer that runs a registry kernel (llmzip.quant_linear.QuantLinear).

    A bound layer holds (`kernel`, `kernel_state`), chosen for and prepared on
    `kernel_device`, plus the reasons of the kernels that refused it (`refused_kernels`).
    The binding remembers which tensors it was prepared from: moving or casting them
    (`.to()`, `.half()`) or loading new ones leaves the layer unbound."""

    kernel: Kernel | None = None
    kernel_state: Any = None
    kernel_device: torch.device | None = None
    refused_kernels: dict[str, str] = {}  # replaced, never mutated in place
    _bound_to: tuple | None = None

    def spec(self) -> LayerSpec:
        raise NotImplementedError

    def kernel_tensors(self) -> list[torch.Tensor]:
        """The tensors a kernel's state is derived from; the first one's device is the layer's."""
        raise NotImplementedError

    def _fingerprint(self) -> tuple:
        return tuple((t.data_ptr(), t.dtype, t.device) for t in self.kernel_tensors())

    def set_binding(self, kernel: Kernel, state: Any, refused: dict[str, str]) -> None:
        self.kernel, self.kernel_state, self.refused_kernels = kernel, state, refused
        self.kernel_device = self.kernel_tensors()[0].device
        self._bound_to = self._fingerprint()

    def unbind(self) -> None:
        self.kernel = self.kernel_state = self.kernel_device = self._bound_to = None
        self.refused_kernels = {}

    def is_bound(self) -> bool:
        """Bound, and to the tensors the layer holds now."""
        return self.kernel is not None and self._bound_to == self._fingerprint()

    @property
    def kernel_name(self) -> str | None:
        return None if self.kernel is None else self.kernel.name
