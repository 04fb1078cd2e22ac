#!/usr/bin/env bash
# Every GPU test and benchmark, in one run, for a session that has a CUDA machine
# (the `device` tool). Writes results under $OUT (or bench/results/gpu when unset).
# The device image has torch + triton preinstalled and no network: carry the other
# dependencies as wheels (here: `pip download -d bench/.wheels transformers accelerate
# safetensors compressed-tensors huggingface_hub tqdm gguf pytest --no-deps`, then pass
# carry=["bench/.wheels"] to the device call) and install llmzip without deps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
if [ -d bench/.wheels ]; then python -m pip install -q --no-index --no-deps bench/.wheels/*.whl; fi
python -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/pytest_gpu.txt"
python bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt"
