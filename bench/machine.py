"""One line naming the CPU a benchmark ran on: model, cores, torch's vector ISA, whether
bf16 matmuls run natively and whether llmzip's AMX int4 kernel runs. CPU results differ by
machine class (AVX2, AVX-512 with bf16, AMX), so every CPU result file records it."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    import torch

    from llmzip.kernels import cpu_int4_amx
    from llmzip.kernels.cpu_dense import native_bf16

    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16 matmul" if native_bf16() else "no native bf16 matmul"
    amx = "AMX int4 kernel" if cpu_int4_amx.available() else "no AMX int4 kernel"
    return f"{cpu_model()}, {os.cpu_count()} CPUs, {isa}, {bf16}, {amx}"


if __name__ == "__main__":
    print(describe())
