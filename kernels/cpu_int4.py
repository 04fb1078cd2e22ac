"""CPU kernel for 4-bit weights that picks, per call, one of three variants by the
activation dtype and the number of rows; each variant is a registry entry of its own:

- `cpu_int4_amx` (AMX tiles, cpu_int4_amx.c): every bf16 call, any number of rows, where
  `cpu_int4_amx.runs` (Intel Sapphire Rapids and later, x86-64 Linux, a C compiler; groups
  of whole 32-column tiles). 1.5-3.5x faster than torch's int4 matmul at 8 rows on SmolLM2's
  layers, 2.7-6.0x from 16 rows, and faster than the dense path below 256 rows (at 256-512
  rows within 5% of it on SmolLM2's layers, 1.6x faster on 4096 x 4096)
  (bench/results/kernels_cpu.md);
- `cpu_int4_torch` (torch's `_weight_int4pack_mm_for_cpu`): bf16/fp16 below `dense_from`
  rows; its time grows with the rows;
- `cpu_int4_dense` (the whole weight dequantized, then one dense matmul): from `dense_from`
  rows = max(DENSE_FROM, weights / DENSE_WEIGHTS_PER_ROW); act-order layers, whose packed
  words are not in K order, take the `reference` there;
- float32 activations take the `reference`, where torch's int4 matmul is 10-30x slower than
  in bf16/fp16.

`CpuInt4State.route(rows, dtype)` is that choice, in one place; its state holds the
variants' own states (built once, by `prepare`); `routes` describes it for
`llmzip info --kernels`. Act-order groups of unequal size are refused at `prepare` (the
registry then binds the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import cpu_codes, cpu_int4_amx, cpu_int4_dense, cpu_int4_torch, reference
from .base import Kernel, LayerSpec
from .cpu_int4_amx import AmxState
from .cpu_int4_dense import DenseState
from .cpu_int4_torch import TorchInt4State

# Rows of x from which dequantize + matmul beats torch's int4 matmul: about 72 for
# SmolLM2's layers (<= 1.8M weights) and 256 for 4096 x 4096, where dequantizing costs
# relatively more (bench/results/kernels_cpu.md). So: max(DENSE_FROM, weights / 65536).
DENSE_FROM = 72
DENSE_WEIGHTS_PER_ROW = 65536

AMX, TORCH_INT4, DENSE, REFERENCE = "cpu_int4_amx", "cpu_int4_torch", "cpu_int4_dense", "reference"


def dense_from(module) -> int:
    return max(DENSE_FROM, module.out_features * module.in_features // DENSE_WEIGHTS_PER_ROW)


@dataclass
class CpuInt4State:
    torch_int4: TorchInt4State
    amx: AmxState | None  # None where the AMX kernel does not run
    dense: DenseState | None  # None for act-order layers (the reference takes their large calls)
    dense_from: int  # rows from which `dense` (or the reference) replaces torch's int4 matmul

    def route(self, rows: int, dtype: torch.dtype) -> str:
        """The variant (registry entry name) that runs `rows` rows of `dtype` activations."""
        if dtype == torch.float32:
            return REFERENCE
        if self.amx is not None and dtype == torch.bfloat16:
            return AMX
        if rows >= self.dense_from:
            return DENSE if self.dense is not None else REFERENCE
        return TORCH_INT4


def can_implement(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    ok, reason = cpu_codes.can_implement(spec, device)
    if not ok:
        return False, reason
    if cpu_int4_amx.runs(spec.out_features, spec.in_features, spec.group_size or spec.in_features):
        return True, "AMX tile matmul on packed nibbles for bf16 input (cpu_int4_amx); torch int4 matmul for fp16"
    return True, (f"torch int4 matmul on packed nibbles (dequantize + matmul from max({DENSE_FROM}, "
                  f"weights/{DENSE_WEIGHTS_PER_ROW}) rows, or fp32)")


def prepare(module) -> CpuInt4State:
    K, N = module.in_features, module.out_features
    codes = cpu_codes.read_codes(module)  # raises Unsupported for ragged act-order groups
    dense = cpu_int4_dense.build(codes) if cpu_int4_dense.usable(codes, K) else None
    amx = cpu_int4_amx.from_codes(codes) if cpu_int4_amx.runs(N, K, codes.group) else None
    return CpuInt4State(cpu_int4_torch.build(codes, K, amx), amx, dense, dense_from(module))


def linear(x: torch.Tensor, module, state: CpuInt4State) -> torch.Tensor:
    variant = state.route(math.prod(x.shape[:-1]), x.dtype)
    if variant == AMX:
        return cpu_int4_amx.layer_linear(x, module, state.amx)
    if variant == TORCH_INT4:
        return cpu_int4_torch.linear(x, module, state.torch_int4)
    if variant == DENSE:
        return cpu_int4_dense.linear(x, module, state.dense)
    return reference.linear(x, module)


def routes(state: CpuInt4State) -> dict[str, str]:
    """{activation dtype: which variant runs, by rows}, from `route` itself."""
    out = {}
    n = state.dense_from
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        few, many = state.route(1, dtype), state.route(n, dtype)
        name = str(dtype).removeprefix("torch.")
        out[name] = f"{few} (any rows)" if few == many else f"{few} below {n} rows, {many} from {n}"
    return out


ENTRY = Kernel("cpu_int4", can_implement, prepare, linear, routes)
