"""Dense bf16 Linear on CPU with its weight prepacked once for oneDNN.

`F.linear` with a bf16 weight hands the weight to oneDNN in its plain layout, and oneDNN
reorders it into its blocked layout on every call. For the few rows of a decode step that
reorder costs as much as the product: SmolLM2's LM head (49152 x 576) at 8 rows runs 1.97x
faster prepacked, its other Linears 1.4-1.6x; at 512 rows (prefill) 1.0-1.1x
(bench/results/prepack_cpu.md). So the serving engine reorders such weights once, here,
and calls oneDNN's linear on the packed copy.

The packed weight is a copy: it costs as much memory as the weight it packs. The result is
the same oneDNN product F.linear computes (tests/test_kernels.py checks it bit for bit).
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN picks the packed layout for a typical number of rows; any row count runs on it.
ROWS_HINT = 8


def available(linear: nn.Module) -> tuple[bool, str]:
    """Whether `linear` (an nn.Linear) can be prepacked here, and why not."""
    w = getattr(linear, "weight", None)
    if type(linear) is not nn.Linear or w is None:
        return False, "not a dense nn.Linear"
    if w.device.type != "cpu":
        return False, f"weight on {w.device.type}, not cpu"
    if w.dtype != torch.bfloat16:
        return False, f"{w.dtype} weight: prepacking is for bf16"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False, "this torch or CPU has no oneDNN bf16 linear"
    return True, "oneDNN bf16 linear on a prepacked weight"


class PackedLinear:
    """y = x @ W^T + b for `linear`'s W and b, on a oneDNN-prepacked copy of W."""

    def __init__(self, linear: nn.Linear):
        ok, why = available(linear)
        if not ok:
            raise ValueError(f"cannot prepack this layer: {why}")
        self.out_features = linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y if x.dim() == 2 else y.reshape(*shape[:-1], self.out_features)


def prepacked(linear: nn.Module):
    """`linear` itself, or a PackedLinear computing the same, when it can be prepacked."""
    return PackedLinear(linear) if available(linear)[0] else linear
