"""Kernel registry: every kernel variant a quantized layer can run, and the one place a
layer's kernel is chosen.

Entries (base.Kernel, one per variant):
- `triton_w4a8`, `triton` (CUDA; triton_entries.py says why GEMV / tiles are one entry);
- `cpu_int4` (CPU, 4-bit): picks one of `cpu_int4_amx`, `cpu_int4_torch`, `cpu_int4_dense`
  or `reference` per call, by dtype and rows (`cpu_int4.CpuInt4State.route`);
- `cpu_int4_amx`, `cpu_int4_torch`, `cpu_int4_dense`: those variants alone (chosen only when
  forced with $LLMZIP_KERNEL; cpu_int4 runs them otherwise);
- `reference` (plain torch, accepts every layer).
`KERNELS` is the automatic order: first match wins, the fastest first, the reference last.

Selection happens once, after the model's final placement: `bind(model)` chooses and
prepares the kernel of every layer not yet bound to the tensors it holds now, on the device
they live on. llmzip.load / checkpoint.load call it (with the device they were given), the
server after it moves the model, the serving pass after it fuses Linears. Moving or casting
a layer's tensors (`.to()`, `.half()`) or loading new ones unbinds it. A layer called while
unbound binds itself once, on its tensors' device (layers quantized in this process, or
moved without `bind`); a layer called with input on another device than the one it is bound
on raises `WrongDevice`.
$LLMZIP_KERNEL=NAME tries that entry first (e.g. `reference` to rule a fast kernel out
when debugging).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import cpu_dense, cpu_int4, cpu_int4_amx, cpu_int4_dense, cpu_int4_torch, reference, triton_entries
from .base import Kernel, KernelLayer, LayerSpec, Unsupported

REFERENCE = reference.ENTRY
TRITON = triton_entries.TRITON
TRITON_W4A8 = triton_entries.TRITON_W4A8
CPU_INT4 = cpu_int4.ENTRY
CPU_INT4_AMX = cpu_int4_amx.ENTRY
CPU_INT4_TORCH = cpu_int4_torch.ENTRY
CPU_INT4_DENSE = cpu_int4_dense.ENTRY

# First match wins: the fastest kernel first, the reference (accepts everything) last.
KERNELS: list[Kernel] = [TRITON_W4A8, TRITON, CPU_INT4, REFERENCE]
# Variants that are only chosen when forced ($LLMZIP_KERNEL): cpu_int4 runs them per call.
VARIANTS: list[Kernel] = [CPU_INT4_AMX, CPU_INT4_TORCH, CPU_INT4_DENSE]


class WrongDevice(RuntimeError):
    """A layer was called with its input on another device than the one it is bound on."""


def register(kernel: Kernel, index: int = 0) -> None:
    """Add a kernel; by default it is tried before all existing ones."""
    KERNELS.insert(index, kernel)


def entries() -> dict[str, Kernel]:
    """Every entry by name: the automatic ones and the forced-only variants."""
    return {k.name: k for k in KERNELS + VARIANTS}


def _order() -> list[Kernel]:
    forced = os.environ.get("LLMZIP_KERNEL")
    if not forced:
        return KERNELS
    first = entries().get(forced)
    return ([first] if first is not None else []) + [k for k in KERNELS if k.name != forced]


def select_kernel(spec: LayerSpec, device: torch.device) -> tuple[Kernel, dict[str, str]]:
    """The first kernel whose `can_implement` accepts `spec` on `device`, and the reasons
    (name -> reason) of the kernels that refused before it (the layer's tensors are not
    consulted: `bind_layer` also lets `prepare` refuse)."""
    refused: dict[str, str] = {}
    for kernel in _order():
        ok, reason = kernel.can_implement(spec, device)
        if ok:
            return kernel, refused
        refused[kernel.name] = reason
    detail = "; ".join(f"{k}: {r}" for k, r in refused.items())
    raise RuntimeError(f"no kernel can run this layer ({spec}): {detail}")


def bind_layer(layer: KernelLayer, force: bool = False) -> Kernel:
    """Choose and prepare `layer`'s kernel on its tensors' device, unless it is bound to
    the tensors it holds now (or `force`). Returns the kernel."""
    if not force and layer.is_bound():
        return layer.kernel
    spec, device = layer.spec(), layer.kernel_tensors()[0].device
    refused: dict[str, str] = {}
    for kernel in _order():
        ok, reason = kernel.can_implement(spec, device)
        if ok:
            try:
                state = kernel.prepare(layer)
            except Unsupported as e:
                ok, reason = False, str(e)
        if not ok:
            refused[kernel.name] = reason
            continue
        layer.set_binding(kernel, state, refused)
        return kernel
    detail = "; ".join(f"{k}: {r}" for k, r in refused.items())
    raise RuntimeError(f"no kernel can run this layer ({spec}): {detail}")


def unbind(layer: KernelLayer) -> None:
    """Drop `layer`'s kernel and state (its tensors changed); it binds again when asked."""
    layer.unbind()


def bind(model: nn.Module, force: bool = False) -> dict[str, dict]:
    """Bind every kernel layer of `model` (see the module docstring); call it once the model
    is where it will run. Layers already bound to their current tensors are kept unless
    `force`. Returns `choices(model)`."""
    for m in model.modules():
        if isinstance(m, KernelLayer):
            bind_layer(m, force)
    return choices(model)


def choices(model: nn.Module) -> dict[str, dict]:
    """{layer name: {"kernel": name or None, "refused": {kernel: reason}, "runs": {dtype:
    what runs, by rows}}} for every kernel layer of `model`, as bound now."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, KernelLayer):
            k = m.kernel
            runs = k.routes(m.kernel_state) if k is not None and k.routes is not None else {}
            out[name] = {"kernel": m.kernel_name, "refused": dict(m.refused_kernels), "runs": runs}
    return out


def check_device(layer: KernelLayer, x: torch.Tensor) -> None:
    if x.device != layer.kernel_device:
        raise WrongDevice(f"input on {x.device}, but this layer is bound on {layer.kernel_device}: move the "
                          f"model with .to() before calling it (its layers bind again on the new device)")


def serving_linear(module: nn.Module, prepack: bool = True) -> nn.Module:
    """What a serving pass calls for one of the model's Linears, after the final placement:
    a kernel layer bound (once) and returned as is; a dense bf16 nn.Linear on CPU, with
    `prepack`, as a cpu_dense.PackedLinear (its weight prepared once for this CPU's
    fastest product); anything else as is."""
    if isinstance(module, KernelLayer):
        bind_layer(module)
        return module
    return cpu_dense.prepacked(module) if prepack else module
