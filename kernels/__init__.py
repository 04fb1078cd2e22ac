"""Kernels for quantized Linear layers: a plain-torch reference and a registry that
picks the first implementation able to run a given layer on a given device."""

from .registry import KERNELS, Kernel, LayerSpec, select_kernel

__all__ = ["KERNELS", "Kernel", "LayerSpec", "select_kernel"]
