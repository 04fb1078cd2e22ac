"""Import of legacy GPTQ and AWQ checkpoints: their tensors -> llmzip's (compressed-tensors) tensors.

Formats read (config.json `quantization_config.quant_method`):

- "gptq" (AutoGPTQ, GPTQModel, transformers' GPTQConfig), per quantized Linear [out, in]:
    qweight  int32 [in*bits/32, out]   unsigned codes u in [0, 2^bits), packed down each
                                        column as one LSB-first bit stream (input index i at
                                        bits [i*bits, (i+1)*bits); for 3 bits codes straddle
                                        words, as in llmzip.packing)
    qzeros   int32 [G, out*bits/32]     stored zero points, the same bit stream along `out`;
                                        `checkpoint_format: gptq` (v1, the default) stores
                                        zero - 1, `gptq_v2` the zero itself
    scales   fp16 [G, out]
    g_idx    int32 [in]                 group of each input column (desc_act reorders it)
  dequant: w[o, i] = (u[o, i] - zero[g_idx[i], o]) * scales[g_idx[i], o]
- "awq", GEMM layout (AutoAWQ `version: gemm`), 4 bits:
    qweight  int32 [in, out/8]   eight codes per word along `out`; nibble k (bits 4k..4k+3)
                                 of word c holds column 8c + AWQ_ORDER[k]
    qzeros   int32 [G, out/8]    zero points, the same interleaved packing (no offset)
    scales   fp16 [G, out]
  dequant: w[o, i] = (u[o, i] - zero[i // group, o]) * scales[i // group, o]

llmzip's codes are signed, c = u - 2^(bits-1), with zero points shifted the same way, so
(c - zc) * s equals the formats' (u - z) * s exactly. A zero point that needs bits + 1
bits (GPTQ v1 stores zero 0 as -1, which reads back as 2^bits) cannot be represented and
is refused. Which Linears are quantized is read from the tensors (those with a qweight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, WeightScheme
from .packing import pack_int32, unpack_int32

LEGACY_METHODS = ("gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k] of its eight
AWQ_REVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j sits in nibble AWQ_REVERSE[j]


class LegacyFormatError(ValueError):
    """A GPTQ/AWQ checkpoint uses a variant llmzip cannot read exactly."""


@dataclass(frozen=True)
class LegacyFormat:
    """What a legacy quantization_config says. zero_offset: added to stored zero points
    (1 for GPTQ v1, 0 for GPTQ v2 and AWQ). group_size None: one group per row."""

    method: str
    bits: int
    group_size: int | None
    zero_offset: int

    def describe(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"{self.method} w{self.bits} {g}"


def read_format(qc: dict) -> LegacyFormat:
    """Parse a `quant_method: gptq|awq` quantization_config; LegacyFormatError names what
    is not supported and what to do instead."""
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    group = None if group in (-1, None) else int(group)
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise LegacyFormatError(f"GPTQ checkpoint_format {fmt!r} is a kernel-specific layout; "
                                    "re-save it as checkpoint_format 'gptq' (e.g. with gptqmodel) first")
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise LegacyFormatError(f"GPTQ bits={bits!r} is not supported: llmzip reads 2..8 bits")
        return LegacyFormat("gptq", bits, group, 1 if fmt == "gptq" else 0)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise LegacyFormatError(f"AWQ version {version!r} is not supported: llmzip reads the GEMM layout "
                                    "(version 'gemm'); re-export the model with AutoAWQ's GEMM version")
        if bits != 4:
            raise LegacyFormatError(f"AWQ bits={bits!r} is not supported: the GEMM layout holds 4-bit codes")
        return LegacyFormat("awq", 4, group, 0)
    raise LegacyFormatError(f"quant_method {method!r} is not a legacy format (need one of {LEGACY_METHODS})")


@dataclass
class LegacyLinear:
    """One Linear in llmzip's terms: codes int8 [out, in] in [-2^(b-1), 2^(b-1)), scale
    [out, G], zero int8 [out, G] (signed, like the codes), g_idx int32 [in]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor

    def contiguous_groups(self) -> bool:
        in_f, groups = self.codes.shape[1], self.scale.shape[1]
        expect = torch.arange(in_f, dtype=torch.int64) // (in_f // groups)
        return torch.equal(self.g_idx.long(), expect)


def _check_zero(zero: torch.Tensor, fmt: LegacyFormat, name: str) -> torch.Tensor:
    top = 1 << (fmt.bits - 1)
    if int(zero.max()) >= top:
        raise LegacyFormatError(
            f"{name}: a zero point of {int(zero.max()) + top} needs {fmt.bits + 1} bits (GPTQ v1 stores zero - 1, "
            f"so a zero of 0 reads back as {1 << fmt.bits}); llmzip cannot hold it exactly")
    return zero.to(torch.int8)


def gptq_linear(qweight, qzeros, scales, g_idx, fmt: LegacyFormat, in_features: int, out_features: int,
                name: str = "layer") -> LegacyLinear:
    """GPTQ tensors (shapes in the module doc) -> LegacyLinear. Pure; exact."""
    groups = scales.shape[0]
    _check_shapes(name, fmt, in_features, out_features, groups)
    codes = unpack_int32(qweight.to(torch.int32), fmt.bits, in_features, dim=0).t().contiguous()
    zero = unpack_int32(qzeros.to(torch.int32), fmt.bits, out_features, dim=1).to(torch.int16) + fmt.zero_offset
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32) // (in_features // groups)
    if g_idx.shape != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise LegacyFormatError(f"{name}: g_idx must hold {in_features} group indices in [0, {groups})")
    return LegacyLinear(codes, scales.t().contiguous(), _check_zero(zero, fmt, name).t().contiguous(),
                        g_idx.to(torch.int32))


def awq_linear(qweight, qzeros, scales, fmt: LegacyFormat, in_features: int, out_features: int,
               name: str = "layer") -> LegacyLinear:
    """AWQ GEMM tensors (shapes in the module doc) -> LegacyLinear. Pure; exact."""
    groups = scales.shape[0]
    _check_shapes(name, fmt, in_features, out_features, groups)
    if out_features % 8:
        raise LegacyFormatError(f"{name}: AWQ GEMM needs out_features divisible by 8, got {out_features}")
    order = (torch.arange(out_features) // 8) * 8 + torch.tensor(AWQ_REVERSE).repeat(out_features // 8)
    codes = unpack_int32(qweight.to(torch.int32), 4, out_features, dim=1)[:, order].t().contiguous()
    zero = unpack_int32(qzeros.to(torch.int32), 4, out_features, dim=1)[:, order]
    g_idx = torch.arange(in_features, dtype=torch.int32) // (in_features // groups)
    return LegacyLinear(codes, scales.t().contiguous(), zero.t().contiguous(), g_idx)


def _check_shapes(name, fmt, in_features, out_features, groups):
    width = in_features if fmt.group_size is None else fmt.group_size
    if in_features % width or groups != in_features // width:
        raise LegacyFormatError(f"{name}: {groups} scale groups for {in_features} inputs at group size "
                                f"{fmt.group_size}; llmzip needs the group size to divide the input width")


def dequantize_legacy(layer: LegacyLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - zero) * scale per column's group, in fp32, cast once: [out, in]."""
    g = layer.g_idx.long()
    return ((layer.codes.float() - layer.zero.float()[:, g]) * layer.scale.float()[:, g]).to(dtype)


def import_state(qc: dict, state: dict[str, torch.Tensor], linears: dict[str, tuple[int, int, bool]]):
    """A legacy checkpoint's state dict -> (llmzip state dict, WeightScheme, act_order, quantized names).

    linears: {module name: (in_features, out_features, has_bias)} of the model's Linears.
    The scheme is symmetric when every zero point is 2^(bits-1) (c = 0 here), and keeps a
    g_idx (act_order) when any layer's groups are not contiguous; both are read from the
    tensors, so an exact import never depends on the config's sym/desc_act flags."""
    fmt = read_format(qc)
    state = dict(state)
    layers: dict[str, LegacyLinear] = {}
    for name, (in_f, out_f, has_bias) in linears.items():
        if f"{name}.qweight" not in state:
            continue
        qweight, qzeros, scales = (state.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales"))
        g_idx = state.pop(f"{name}.g_idx", None)
        if fmt.method == "gptq":
            layers[name] = gptq_linear(qweight, qzeros, scales, g_idx, fmt, in_f, out_f, name)
        else:
            layers[name] = awq_linear(qweight, qzeros, scales, fmt, in_f, out_f, name)
        bias = state.get(f"{name}.bias")
        if bias is not None and not has_bias:  # some GPTQ exporters store an all-zero bias for every Linear
            if bool(bias.any()):
                raise LegacyFormatError(f"{name}: the checkpoint has a non-zero bias the model has no place for")
            del state[f"{name}.bias"]
    leftover = [k for k in state if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    if leftover:
        raise LegacyFormatError(f"quantized tensors for modules the model has no Linear for: {leftover[:3]}")
    if not layers:
        raise LegacyFormatError(f"no Linear of the model has a qweight tensor: is this a {fmt.method} checkpoint?")
    symmetric = all(not bool(lay.zero.any()) for lay in layers.values())
    act_order = not all(lay.contiguous_groups() for lay in layers.values())
    try:
        scheme = WeightScheme(bits=fmt.bits, group_size=fmt.group_size, symmetric=symmetric)
    except ConfigError as e:
        raise LegacyFormatError(str(e)) from e
    for name, lay in layers.items():
        out_f, in_f = lay.codes.shape
        state[f"{name}.weight_packed"] = pack_int32(lay.codes, fmt.bits, dim=1)
        state[f"{name}.weight_scale"] = lay.scale
        state[f"{name}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        if not symmetric:
            state[f"{name}.weight_zero_point"] = pack_int32(lay.zero, fmt.bits, dim=0)
        if act_order:
            state[f"{name}.weight_g_idx"] = lay.g_idx
    return state, scheme, act_order, sorted(layers)
