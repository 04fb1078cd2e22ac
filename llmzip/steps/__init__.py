"""Per-layer steps of calibrated recipes (see base.py); importing this package
registers every step."""

from . import awq, gptq, rtn, signround  # noqa: F401  (each module registers its step)
from .base import STEPS, LayerWork, reference_keep, run_steps

__all__ = ["STEPS", "LayerWork", "reference_keep", "run_steps"]
