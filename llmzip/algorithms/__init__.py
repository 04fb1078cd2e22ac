"""Quantization algorithms: pure functions from tensors to (q, scale, zero)."""

from .rtn import QuantResult, rtn

__all__ = ["QuantResult", "rtn"]
