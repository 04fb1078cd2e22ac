"""4-bit weights x bf16 activations on CPUs with AMX (cpu_int4_amx.c).

torch's int4 matmul (`_weight_int4pack_mm_for_cpu`) converts every weight again for each 4
rows of x and multiplies with AVX512 FMAs, so its time grows with the rows: 8 rows cost
twice 4. This kernel converts each weight once per call (exactly: bf16 0x4300 | u = 128 + u)
and multiplies it into up to 16 rows with AMX tile products, summing in fp32; numerically it
is the dequantized matmul in fp32, rounded once to bf16 (tests/test_kernels.py), and a row's
result does not depend on the other rows. bench/results/kernels_cpu.md has its speed.

The C source is compiled on first use with the system C compiler into
$LLMZIP_CACHE/kernels/ (about a second), keyed by the source and the compiler, and loaded
with ctypes, which releases the GIL during the call as a torch op does. `available()` is
False (and cpu_int4 keeps torch's int4 matmul) where the CPU or the OS lacks AMX-BF16, the
platform is not x86-64 Linux, no compiler is found, or LLMZIP_NATIVE=0 is set.

Registry entry `cpu_int4_amx` (bf16 activations only; cpu_int4 sends it every bf16 call
where it runs, whatever the number of rows).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llmzip.paths import cache_dir

from . import cpu_codes
from .base import Kernel, LayerSpec

log = logging.getLogger("llmzip.kernels")

SOURCE = Path(__file__).with_name("cpu_int4_amx.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
BLOCK_N = 16  # columns per weight tile
GROUP_MULTIPLE = 32  # k per tile product: groups must be whole tiles


def build(cc: str) -> Path:
    """Compile the kernel (once per source and compiler) and return the shared library's path."""
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(src + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_int4_amx-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}:\n{res.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders each leave a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built and loaded library on x86-64 Linux with a C compiler, else None."""
    if os.environ.get("LLMZIP_NATIVE") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    cc = shutil.which(os.environ.get("CC") or "gcc") or shutil.which("cc")
    if cc is None:
        log.info("no C compiler found: 4-bit CPU matmuls use torch's int4 kernel")
        return None
    try:
        lib = ctypes.CDLL(str(build(cc)))  # torch is loaded: its OpenMP runtime is the one used
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the AMX int4 kernel is unavailable (%s): using torch's int4 kernel", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.llmzip_int4_linear_amx.argtypes = [p, i64, i64, i64, i64, p, p, p, p]
    lib.llmzip_int4_linear_amx.restype = ctypes.c_int
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: built, and the CPU and OS give this process AMX-BF16."""
    lib = library()
    return bool(lib is not None and lib.llmzip_amx_ready())


def runs(out_features: int, in_features: int, group: int) -> bool:
    """Whether the kernel runs here, on a layer of this shape and group size."""
    return out_features % BLOCK_N == 0 and group % GROUP_MULTIPLE == 0 and in_features % group == 0 and available()


def pack(u: torch.Tensor) -> torch.Tensor:
    """Codes u [N, K] (0..15) -> the kernel's layout (see cpu_int4_amx.c), uint8 [N * K / 2]."""
    N, K = u.shape
    v = u.to(torch.uint8).view(N // BLOCK_N, BLOCK_N, K // 4, 2, 2)  # (block, column, chunk, half, j): k = 4c + 2h + j
    v = v.permute(0, 2, 1, 4, 3)  # (block, chunk, column, j, half): byte 2 * column + j of the chunk
    return (v[..., 0] | (v[..., 1] << 4)).contiguous().view(-1)


def unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """pack's inverse: codes [N, K]."""
    b = packed.view(N // BLOCK_N, K // 4, BLOCK_N, 2)
    v = torch.stack([b & 15, b >> 4], dim=-1)  # (block, chunk, column, j, half)
    return v.permute(0, 2, 1, 4, 3).reshape(N, K)


@dataclass(frozen=True)
class AmxState:
    """The codes in the kernel's layout (`pack`); w = (u - offset) * scale per group."""

    packed: torch.Tensor  # uint8 [N * K / 2]
    scale: torch.Tensor  # fp32 [n_groups, N]
    offset: torch.Tensor  # fp32 [n_groups, N]
    group: int
    N: int
    K: int
    perm: torch.Tensor | None = None  # act-order column order, applied to x


def prepare(u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
            perm: torch.Tensor | None = None) -> AmxState:
    """u [N, K] codes 0..15; scale, offset [N, K / group]: w = (u - offset) * scale."""
    return AmxState(pack(u), scale.t().float().contiguous(), offset.t().float().contiguous(), group,
                    u.shape[0], u.shape[1], perm)


def from_codes(codes: cpu_codes.Codes) -> AmxState:
    return prepare((codes.q + 8).to(torch.uint8), codes.scale, codes.z + 8, codes.group, codes.perm)


def linear(x2: torch.Tensor, c: AmxState) -> torch.Tensor:
    """x2 [M, K] bf16 -> [M, N] bf16 (the caller checks `available()`)."""
    x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], c.N, dtype=torch.bfloat16)
    rc = library().llmzip_int4_linear_amx(x2.data_ptr(), x2.shape[0], c.K, c.N, c.group,
                                          c.packed.data_ptr(), c.scale.data_ptr(), c.offset.data_ptr(),
                                          y.data_ptr())
    if rc:
        raise MemoryError("the AMX int4 kernel could not allocate its row sums")
    return y


def can_implement(spec: LayerSpec, device: torch.device) -> tuple[bool, str]:
    ok, reason = cpu_codes.can_implement(spec, device)
    if not ok:
        return False, reason
    if not runs(spec.out_features, spec.in_features, spec.group_size or spec.in_features):
        return False, (f"needs AMX-BF16 (available here: {available()}), out_features % {BLOCK_N} == 0 "
                       f"and groups of {GROUP_MULTIPLE}k columns")
    return True, "AMX tile matmul on packed nibbles (cpu_int4_amx.c), bf16 activations, any rows"


def prepare_layer(module) -> AmxState:
    return from_codes(cpu_codes.read_codes(module))


def layer_linear(x: torch.Tensor, module, state: AmxState) -> torch.Tensor:
    if x.dtype != torch.bfloat16:
        raise TypeError(f"the AMX int4 kernel takes bf16 activations, not {x.dtype} (cpu_int4 routes others)")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if state.perm is not None:
        x2 = x2[:, state.perm]
    return cpu_codes.apply_bias_and_shape(linear(x2, state), x, module)


ENTRY = Kernel("cpu_int4_amx", can_implement, prepare_layer, layer_linear)
