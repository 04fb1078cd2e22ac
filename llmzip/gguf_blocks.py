"""llmzip codes -> GGML quantized blocks, exactly (pure functions on tensors).

Only schemes whose values a GGML block type reproduces without requantizing are mapped:

  llmzip scheme            GGML type  block of 32 weights (bytes, little-endian)     value
  W4 g32 symmetric         Q4_0       d fp16 | 16 B: byte j = q[j] | q[j+16] << 4   d * (q - 8)
  W4 g32 asymmetric        Q4_1       d fp16 | m fp16 | 16 B as Q4_0                d * q + m
  W8 g32 symmetric         Q8_0       d fp16 | 32 x int8 q                          d * q

with q = c + 8 for 4-bit codes c in [-8, 7] (Q8_0: q = c). So d is llmzip's scale and,
for Q4_1, m = -(z + 8) * s. The block values equal llmzip's dequantized weights
(c - z) * s (computed in fp32) exactly when d (and m) are fp16 numbers:
- d: a bf16 scale is an fp16 number inside fp16's range (>= 2^-24 with at most 8
  significant bits above 2^-17 ...); `check_exact` verifies every block that has a
  non-zero code (an all-zero block is 0 whatever its d).
- m: (z + 8) * s needs up to 4 more significant bits than s; for a bf16 scale and
  z + 8 in {9, 11, 13, 15} the product can need 12 bits, one more than fp16 has. Such
  blocks round m to the nearest fp16 (half an fp16 ulp of m); the exporter counts them.

K-quants: Q4_K's super-blocks of 256 weights store 8 sub-blocks of 32 with 4-bit codes
q, 6-bit integer scales sc and mins mn and two fp16 factors: d * sc * q - dmin * mn.
llmzip's W4 g32 codes fit (q = c + 8) exactly, but its eight per-group scales s_j would
have to be integer multiples d * sc_j (sc_j <= 63) of one fp16 d, which they are not in
general: requantizing them changes each group's scale by up to 1/(2 sc_j) (0.8% at
sc_j = 63), so a Q4_K export would not be exact and llmzip does not write one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, WeightScheme

BLOCK = 32


@dataclass(frozen=True)
class GGUFMapping:
    type_name: str  # GGMLQuantizationType member name
    bits: int
    symmetric: bool
    file_type: str  # gguf.LlamaFileType member name


MAPPINGS = (
    GGUFMapping("Q4_0", 4, True, "MOSTLY_Q4_0"),
    GGUFMapping("Q4_1", 4, False, "MOSTLY_Q4_1"),
    GGUFMapping("Q8_0", 8, True, "MOSTLY_Q8_0"),
)


def mapping_for(scheme: WeightScheme, act_order: bool = False) -> GGUFMapping:
    """The GGML type that holds `scheme` exactly, or ConfigError naming the nearest one."""
    exact = [m for m in MAPPINGS if m.bits == scheme.bits and m.symmetric == scheme.symmetric]
    if exact and scheme.group_size == BLOCK and not act_order:
        return exact[0]
    bits = scheme.bits if scheme.bits in (4, 8) else (4 if scheme.bits < 6 else 8)
    sym = scheme.symmetric if bits == 4 else True
    near = next(m for m in MAPPINGS if m.bits == bits and m.symmetric == sym)
    flags = f"--bits {bits} --group-size {BLOCK}" + ("" if sym else " --asym")
    what = f"w{scheme.bits} {'channel' if scheme.group_size is None else f'g{scheme.group_size}'} " \
           f"{'sym' if scheme.symmetric else 'asym'}{' act-order (g_idx)' if act_order else ''}"
    return _refuse(what, near, flags)


def _refuse(what: str, near: GGUFMapping, flags: str):
    raise ConfigError(f"{what} has no exact GGUF type (GGUF holds W4 g32 sym as Q4_0, W4 g32 asym as Q4_1, "
                      f"W8 g32 sym as Q8_0); nearest: {near.type_name} with {flags}")


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 values [..., n] -> their little-endian bytes [..., 2n] as uint8."""
    return x.to(torch.float16).contiguous().view(torch.int16).view(torch.uint8)


def q4_0_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes int8 [out, in] in [-8, 7], scale [out, in/32] -> uint8 [out, in/32 * 18]."""
    out_f, in_f = codes.shape
    q = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(out_f, in_f // BLOCK, BLOCK)
    qs = q[..., :16] | (q[..., 16:] << 4)
    d = _fp16_bytes(scale.unsqueeze(-1)).reshape(out_f, in_f // BLOCK, 2)
    return torch.cat([d, qs], -1).reshape(out_f, -1)


def q4_1_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes int8 [out, in], scale [out, in/32], zero int8 [out, in/32] -> uint8 [out, in/32 * 20];
    m = -(zero + 8) * scale, rounded to fp16 (exact where `q4_1_inexact_min` is False)."""
    out_f, in_f = codes.shape
    q = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(out_f, in_f // BLOCK, BLOCK)
    qs = q[..., :16] | (q[..., 16:] << 4)
    d = _fp16_bytes(scale.unsqueeze(-1)).reshape(out_f, in_f // BLOCK, 2)
    m = _fp16_bytes(q4_1_min(scale, zero).unsqueeze(-1)).reshape(out_f, in_f // BLOCK, 2)
    return torch.cat([d, m, qs], -1).reshape(out_f, -1)


def q4_1_min(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The exact block minimum -(zero + 8) * scale in fp32 (before it is stored as fp16)."""
    return -(zero.float() + 8) * scale.float()


def q8_0_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes int8 [out, in] in [-128, 127], scale [out, in/32] -> uint8 [out, in/32 * 34]."""
    out_f, in_f = codes.shape
    qs = codes.contiguous().view(torch.uint8).reshape(out_f, in_f // BLOCK, BLOCK)
    d = _fp16_bytes(scale.unsqueeze(-1)).reshape(out_f, in_f // BLOCK, 2)
    return torch.cat([d, qs], -1).reshape(out_f, -1)


def inexact_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """bool [out, in/32]: blocks whose GGML values differ from llmzip's (c - z) * s in fp32,
    because d (for a block with a non-zero code) or, for Q4_1, m is not an fp16 number."""
    out_f, in_f = codes.shape
    s = scale.float()
    d_bad = s.to(torch.float16).float() != s
    used = codes.reshape(out_f, in_f // BLOCK, BLOCK).ne(0 if zero is None else -8).any(-1)
    bad = d_bad & used  # Q4_1: d multiplies q = c + 8, which is 0 only for c = -8
    if zero is not None:
        m = q4_1_min(scale, zero)
        bad = bad | (m.to(torch.float16).float() != m)
    return bad


def blocks_for(mapping: GGUFMapping, codes, scale, zero) -> torch.Tensor:
    if mapping.type_name == "Q4_0":
        return q4_0_blocks(codes, scale)
    if mapping.type_name == "Q4_1":
        return q4_1_blocks(codes, scale, zero)
    return q8_0_blocks(codes, scale)
