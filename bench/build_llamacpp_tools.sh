#!/usr/bin/env bash
# llama.cpp's llama-quantize and llama-imatrix, built from the llama.cpp sources inside the
# llama-cpp-python sdist that bench/setup_peers.sh installs (same version as the library).
# For bench/gguf_llamacpp.py. ~20 min on 2 busy cores.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=0.3.16
mkdir -p .venvs/src .venvs/llamacpp-src
[ -f .venvs/src/llama_cpp_python-$VERSION.tar.gz ] || \
  python3 -m pip download --no-deps --no-binary :all: -d .venvs/src "llama-cpp-python==$VERSION"
[ -d .venvs/llamacpp-src/llama_cpp_python-$VERSION ] || \
  tar -xzf .venvs/src/llama_cpp_python-$VERSION.tar.gz -C .venvs/llamacpp-src
SRC=.venvs/llamacpp-src/llama_cpp_python-$VERSION/vendor/llama.cpp
cmake -S "$SRC" -B .venvs/llamacpp-tools -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
nice -n 10 cmake --build .venvs/llamacpp-tools -j "${JOBS:-1}" --target llama-quantize llama-imatrix
# convert_hf_to_gguf.py needs mistral-common (and sentencepiece) beside torch/transformers:
# a venv that sees llmzip's packages through a .pth file and adds only those.
if [ ! -x .venvs/ggufconvert/bin/python ]; then
  python3 -m venv .venvs/ggufconvert
  site=$(.venvs/ggufconvert/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  ../.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/llmzip_env.pth"
  .venvs/ggufconvert/bin/python -m pip install -q --no-deps mistral-common
  .venvs/ggufconvert/bin/python -m pip install -q jsonschema "pydantic-extra-types[pycountry]" tiktoken sentencepiece
fi
