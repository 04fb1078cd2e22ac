"""QuantLinear: a Linear layer that holds packed integer weights.

Its tensors are named and laid out exactly as in a compressed-tensors
"pack-quantized" checkpoint, so saving is a plain state_dict dump and loading is a
plain `load_state_dict(assign=True)`:
  weight_packed      int32 [out, ceil(in*bits/32)]   codes, see llmzip.packing
  weight_scale       [out, n_groups]                 model dtype
  weight_shape       int64 [2]                       (out, in)
  weight_zero_point  int32 [ceil(out*bits/32), n_groups]  asymmetric only
  weight_g_idx       int32 [in]                      act-order only
  bias               [out]                           when the original had one
The forward pass runs the kernel it is bound to: `llmzip.kernels.registry.bind(model)`
chooses and prepares it once the model is placed (see the registry's docstring: a layer
called while unbound binds itself once; moving or casting it unbinds it).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import WeightScheme, parse_activations
from .kernels import registry
from .kernels.base import KernelLayer, LayerSpec
from .packing import pack_int32, packed_len


class QuantLinear(nn.Module, KernelLayer):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: WeightScheme,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.act_order = scheme, act_order
        scheme.check_layer("<QuantLinear>", out_features, in_features)
        n_groups = scheme.groups(in_features)
        kw = {"device": device}
        self.register_buffer(
            "weight_packed",
            torch.empty(out_features, packed_len(in_features, scheme.bits), dtype=torch.int32, **kw),
        )
        self.register_buffer("weight_scale", torch.empty(out_features, n_groups, dtype=dtype, **kw))
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        if not scheme.symmetric:
            self.register_buffer(
                "weight_zero_point",
                torch.empty(packed_len(out_features, scheme.bits), n_groups, dtype=torch.int32, **kw),
            )
        if act_order:
            self.register_buffer("weight_g_idx", torch.empty(in_features, dtype=torch.int32, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self._dense: dict | None = None  # dtype -> dequantized weight, inside cached_dense_weights
        self.activations = "fp16"  # "fp8": per-token e4m3 activations (W4A8), see set_activations

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @classmethod
    def from_quantized(
        cls,
        linear: nn.Linear,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        scheme: WeightScheme,
        g_idx: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Build from int8 codes q [out, in], scale [out, G], zero int8 [out, G]."""
        dev = linear.weight.device
        m = cls(
            linear.in_features, linear.out_features, scheme, linear.bias is not None,
            act_order=g_idx is not None, dtype=scale.dtype, device=dev,
        )
        m.weight_packed.copy_(pack_int32(q, scheme.bits, dim=1))
        m.weight_scale.copy_(scale)
        if zero is not None:
            m.weight_zero_point.copy_(pack_int32(zero, scheme.bits, dim=0))
        if g_idx is not None:
            m.weight_g_idx.copy_(g_idx.to(torch.int32))
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.data.to(scale.dtype))
        return m

    def spec(self) -> LayerSpec:
        s = self.scheme
        return LayerSpec(s.bits, s.group_size, s.symmetric, self.act_order, self.in_features, self.out_features,
                         self.activations)

    def kernel_tensors(self) -> list[torch.Tensor]:
        names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "bias")
        return [t for t in (getattr(self, n, None) for n in names) if t is not None]

    def select_kernel(self, device: torch.device | None = None):
        """Choose and prepare the kernel again (e.g. after setting $LLMZIP_KERNEL), on the
        device the layer's tensors are on."""
        if device is not None and torch.device(device) != self.weight_packed.device:
            raise registry.WrongDevice(f"this layer's tensors are on {self.weight_packed.device}, not {device}: "
                                       "move it with .to() first")
        return registry.bind_layer(self, force=True)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half(): a state derived from tensors that were replaced is stale.
        out = super()._apply(fn, recurse)
        if self.kernel is not None and not self.is_bound():
            self.unbind()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self.unbind()
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            w = self._dense.get(x.dtype)
            if w is None:
                from llmzip.kernels.reference import dense_weight

                w = self._dense[x.dtype] = dense_weight(self, x.dtype)
            return F.linear(x, w, self.bias)
        if self.kernel is None:
            registry.bind_layer(self)  # unbound (quantized in this process, or moved): once
        if x.device != self.kernel_device:
            registry.check_device(self, x)
        return self.kernel.linear(x, self, self.kernel_state)

    def extra_repr(self) -> str:
        s = self.scheme
        g = "channel" if s.group_size is None else f"g{s.group_size}"
        sym = "sym" if s.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, w{s.bits} {g} {sym}, bias={self.bias is not None}"


@contextmanager
def cached_dense_weights(module: nn.Module):
    """Inside the block, each QuantLinear under `module` dequantizes its weight once
    (as the reference kernel does) and reuses it for every call: for many passes over
    one layer, as calibration makes. The dense copies are dropped on exit."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m._dense = {}
    try:
        yield
    finally:
        for m in layers:
            m._dense = None


def set_activations(model: nn.Module, activations: str) -> None:
    """Run the QuantLinears with `activations` (a spec of parse_activations: "fp16", "fp8" or
    "fp8-except=NAMES"); their kernels are chosen again (by `llmzip.kernels.registry.bind`, or
    on their next call). A name in the except list that no quantized Linear has is an error."""
    mode, kept = parse_activations(activations)
    quantized = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    unknown = kept - {name for name, _ in quantized}
    if unknown:
        raise ValueError(f"activations {activations!r}: no quantized Linear is named {', '.join(sorted(unknown))}")
    for name, m in quantized:
        m.activations = "fp16" if name in kept else mode
        registry.unbind(m)
