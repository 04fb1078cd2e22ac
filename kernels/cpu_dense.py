"""Dense bf16 Linear on CPU with its weight prepared once for the CPU's fastest product.

On CPUs with native bf16 arithmetic (oneDNN's bf16 path: AVX512-BF16, AMX), `F.linear`
with a bf16 weight hands the weight to oneDNN in its plain layout, and oneDNN reorders it
into its blocked layout on every call. For the few rows of a decode step that reorder costs
as much as the product: SmolLM2's LM head (49152 x 576) at 8 rows runs 1.97x faster
prepacked, its other Linears 1.4-1.6x; at 512 rows (prefill) 1.0-1.1x
(bench/results/prepack_cpu.md). So the serving engine reorders such weights once, here,
and calls oneDNN's linear on the packed copy: the same product F.linear computes
(tests/test_kernels.py checks it bit for bit).

On CPUs without it (AVX2), a bf16 matmul of more than one row is far slower than the same
product in fp32 (bf16 F.linear's time grows with the rows); there the copy is the weight
in fp32 and the product runs in fp32 (`W @ x^T`, then rounded once to bf16): the bf16
inputs' exact products summed in fp32, as F.linear sums them, in another order. One or two
rows (decode steps of one or two streams) still run on the bf16 weight: such a product is
bound by reading the weight, and bf16 is half the bytes (bench/results/prepack_cpu_avx2.md).

Either copy costs memory: as much as the weight (oneDNN) or twice as much (fp32).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# oneDNN picks the packed layout for a typical number of rows; any row count runs on it.
ROWS_HINT = 8
# fp32 copies: up to this many rows, F.linear on the bf16 weight is as fast or faster (see above).
BF16_ROWS = 2


@functools.cache
def native_bf16() -> bool:
    """Whether this torch and CPU run bf16 matmuls natively (oneDNN's bf16 path)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def native_fp16() -> bool:
    """Whether this torch and CPU run fp16 matmuls natively (oneDNN's fp16 path:
    AVX512-FP16, AMX-FP16)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported())


# The products that a half-precision forward or a Hessian spends its time in (attention
# has its own CPU kernel, no slower than fp32's).
_PRODUCTS = frozenset({F.linear, torch.mm, torch.bmm, torch.matmul, torch.addmm,
                       torch.baddbmm, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.matmul,
                       torch.Tensor.__matmul__})


class _Fp32Products(TorchFunctionMode):
    """Runs each CPU product of _PRODUCTS with an input in one of `dtypes` in fp32 and
    rounds its result once to that dtype."""

    def __init__(self, dtypes: frozenset):
        super().__init__()
        self.dtypes = dtypes

    def _slow(self, a) -> bool:
        return isinstance(a, torch.Tensor) and a.dtype in self.dtypes and a.device.type == "cpu"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            half = next((a.dtype for a in (*args, *kwargs.values()) if self._slow(a)), None)
            if half is not None:
                def up(a):
                    return a.float() if self._slow(a) else a

                out = func(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
                return out.to(half)
        return func(*args, **kwargs)


def emulated_halves(device) -> frozenset:
    """The half dtypes (bf16, fp16) whose matmuls this device runs only as slow loops: on a
    CPU, each one without a native oneDNN path; none elsewhere."""
    if torch.device(device).type != "cpu":
        return frozenset()
    return frozenset(d for d, native in ((torch.bfloat16, native_bf16()), (torch.float16, native_fp16()))
                     if not native)


def fp32_products(device) -> contextlib.AbstractContextManager:
    """Within it, bf16 and fp16 matmuls and linears on the CPU run in fp32 (inputs upcast,
    the result rounded once to the input's dtype), for each of the two that this CPU has
    no native matmul for; elsewhere it does nothing. For bulk forwards of a half-precision
    model in calibration and evaluation: on an AVX2 CPU torch's bf16 and fp16 GEMMs are
    scalar loops (bench/bf16_products.py measures bf16). The results are the inputs' exact
    products summed in fp32, as half-precision GEMMs sum them, in another order."""
    dtypes = emulated_halves(device)
    return _Fp32Products(dtypes) if dtypes else contextlib.nullcontext()


def outside_products():
    """Within it, no torch-function mode applies, fp32_products included: for fp32
    numeric work inside a calibration (a GPTQ solve, a clip search), whose many small ops
    would each pay the mode's Python dispatch for no change in result (a GPTQ solve of
    one 576 x 1536 weight with its clip search spent about 20% longer inside the mode on
    an AVX2 EPYC). Tensor subclasses' own torch functions are off within it too."""
    return torch._C.DisableTorchFunction()


def available(linear: nn.Module) -> tuple[bool, str]:
    """Whether `linear` (an nn.Linear) can be prepacked here, and why not."""
    w = getattr(linear, "weight", None)
    if type(linear) is not nn.Linear or w is None:
        return False, "not a dense nn.Linear"
    if w.device.type != "cpu":
        return False, f"weight on {w.device.type}, not cpu"
    if w.dtype != torch.bfloat16:
        return False, f"{w.dtype} weight: prepacking is for bf16"
    if native_bf16():
        return True, "oneDNN bf16 linear on a prepacked weight"
    return True, "fp32 copy of the weight (this CPU has no native bf16 matmul)"


def fp32_linear(x2: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x2 [M, K] @ w32[N, K]^T (+ bias) in fp32, as a contiguous [M, N] tensor in `dtype`,
    computed as W @ x^T (no committed benchmark compares it with F.linear(x, W))."""
    y = torch.mm(w32, x2.float().t()).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype, memory_format=torch.contiguous_format)


class PackedLinear:
    """y = x @ W^T + b for `linear`'s W and b, on a copy of W prepared once: oneDNN-prepacked
    bf16 where the CPU has native bf16 matmuls, else fp32 (see the module docstring).
    mode: "auto" (that choice), "onednn" or "fp32"."""

    def __init__(self, linear: nn.Linear, mode: str = "auto"):
        ok, why = available(linear)
        if not ok:
            raise ValueError(f"cannot prepack this layer: {why}")
        if mode not in ("auto", "onednn", "fp32"):
            raise ValueError(f"mode {mode!r}: choose auto, onednn or fp32")
        if mode == "onednn" and not native_bf16():
            raise ValueError("this torch or CPU has no oneDNN bf16 linear")
        self.mode = mode if mode != "auto" else ("onednn" if native_bf16() else "fp32")
        self.out_features = linear.out_features
        with torch.no_grad():
            w = linear.weight.detach()
            if self.mode == "onednn":
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT)
            else:
                self.packed = w.float().contiguous()
                self.weight = w  # the layer's own bf16 weight, not a copy
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if self.mode == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        elif x2.shape[0] <= BF16_ROWS and x.dtype == self.weight.dtype:
            y = torch.nn.functional.linear(x2, self.weight, self.bias)
        else:
            y = fp32_linear(x2, self.packed, self.bias, x.dtype)
        return y if x.dim() == 2 else y.reshape(*shape[:-1], self.out_features)


def prepacked(linear: nn.Module):
    """`linear` itself, or a PackedLinear computing the same, when it can be prepacked."""
    return PackedLinear(linear) if available(linear)[0] else linear
