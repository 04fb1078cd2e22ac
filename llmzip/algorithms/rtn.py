"""Round-to-nearest weight quantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ClipSearch, WeightScheme
from ..primitives import dequantize, minmax_qparams, mse_clip_qparams, quantize


@dataclass
class QuantResult:
    """Output of every weight quantizer.

    q: int8 [out, in] signed codes; scale: [out, n_groups] in the model dtype;
    zero: int8 [out, n_groups] or None (symmetric); g_idx: int32 [in] group of each
    input column, or None when groups are contiguous.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None = None

    def dequantize(self, group_size: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, group_size, dtype, g_idx=self.g_idx)

    def rows(self, start: int, stop: int) -> "QuantResult":
        """The result for output rows [start, stop) (every field is row-wise but g_idx)."""
        zero = None if self.zero is None else self.zero[start:stop]
        return QuantResult(self.q[start:stop], self.scale[start:stop], zero, self.g_idx)

    def rel_err(self, weight: torch.Tensor, group_size: int | None) -> float:
        """||W - dequant(q)||_F / ||W||_F, rounded to 6 decimals."""
        w = weight.float()
        return round(((self.dequantize(group_size) - w).norm() / w.norm().clamp(min=1e-30)).item(), 6)


@torch.no_grad()
def rtn(
    weight: torch.Tensor, scheme: WeightScheme, clip: ClipSearch | None = None
) -> QuantResult:
    """Quantize weight [out, in] to the nearest grid point of per-group min/max (or
    MSE-clipped) ranges. Scales are stored in weight.dtype."""
    if clip is None:
        scale, zero = minmax_qparams(weight, scheme, weight.dtype)
    else:
        scale, zero = mse_clip_qparams(weight, scheme, weight.dtype, clip)
    return QuantResult(quantize(weight, scale, zero, scheme), scale, zero)
