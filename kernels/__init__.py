"""Kernels for quantized Linear layers: a plain-torch reference and a registry that
picks the first implementation able to run a given layer on a given device."""

if __name__ != "llmzip.kernels":  # imported as a bare `kernels`: see llmzip/layout.py
    from llmzip.layout import hand_over

    hand_over(__name__, __file__)
else:
    from .registry import KERNELS, Kernel, LayerSpec, select_kernel

    __all__ = ["KERNELS", "Kernel", "LayerSpec", "select_kernel"]
