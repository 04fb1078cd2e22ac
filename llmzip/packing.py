"""Dense int32 packing of signed b-bit codes (the compressed-tensors layout).

Layout, along the packed dimension (columns for weights, rows for zero points):
- code c in [-2^(b-1), 2^(b-1)) is stored unsigned as u = c + 2^(b-1);
- element i occupies bits [i*b, (i+1)*b) of one continuous little-endian bit stream
  (LSB-first), so 32 elements fill exactly b int32 words and, for b = 3, 5, 6, 7,
  an element may straddle two words;
- the stream is padded with zero bits to a whole number of int32 words:
  n elements -> ceil(n*b / 32) words.
For b = 4 this is the familiar eight nibbles per int32, element 0 in bits 0..3.
"""

from __future__ import annotations

import math

import torch


def packed_len(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def _bit_positions(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes [rows, n] (dim=1) or [n, cols] (dim=0) into int32 words."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int32 expects int8 codes, got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor, got shape {tuple(q.shape)}")
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    rows, n = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    word, offset = _bit_positions(n, bits, q.device)
    n_words = packed_len(n, bits)
    # Accumulate into int64 so bits that spill past bit 31 are kept for the next word.
    acc = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=q.device)
    shifted = u << offset
    acc.index_add_(1, word, shifted & 0xFFFFFFFF)
    acc.index_add_(1, word + 1, shifted >> 32)
    out = acc[:, :n_words]
    # Reinterpret the low 32 bits as a signed int32.
    out = torch.where(out >= (1 << 31), out - (1 << 32), out)
    return out.to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> int8 codes with n elements along `dim`."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int32 expects int32 words, got {packed.dtype}")
    if dim == 0:
        return unpack_int32(packed.t(), bits, n, 1).t().contiguous()
    if packed.shape[1] != packed_len(n, bits):
        raise ValueError(
            f"{packed.shape[1]} int32 words cannot hold {n} {bits}-bit values "
            f"(expected {packed_len(n, bits)})"
        )
    if 32 % bits == 0:  # 2, 4, 8 bits: whole codes per word, a shift and a mask
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        u = u.reshape(packed.shape[0], -1)[:, :n]
        return (u - (1 << (bits - 1))).to(torch.int8)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)
    word, offset = _bit_positions(n, bits, packed.device)
    both = words[:, word] | (words[:, word + 1] << 32)
    u = (both >> offset) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)
