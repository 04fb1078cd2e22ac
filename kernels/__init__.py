"""Kernels for quantized Linear layers: a plain-torch reference and a registry that binds
each layer, once it is placed, to the first kernel able to run it there (registry.py)."""

if __name__ != "llmzip.kernels":  # imported as a bare `kernels`: see llmzip/layout.py
    from llmzip.layout import hand_over

    hand_over(__name__, __file__)
else:
    from .base import Kernel, KernelLayer, LayerSpec, Unsupported
    from .registry import KERNELS, WrongDevice, bind, bind_layer, choices, select_kernel, unbind

    __all__ = ["KERNELS", "Kernel", "KernelLayer", "LayerSpec", "Unsupported", "WrongDevice", "bind", "bind_layer",
               "choices", "select_kernel", "unbind"]
