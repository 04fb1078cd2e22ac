#!/usr/bin/env bash
# llama.cpp from the sources inside the llama-cpp-python sdist (one version for all of it):
# - bench/.venvs/llamacpp-tools/bin: libllama/libggml* (shared) and llama-quantize,
#   llama-imatrix, llama-perplexity, built once with cmake;
# - bench/.venvs/llamacpp: llama-cpp-python's Python package from the same sdist, installed
#   without building its own copy of the library (LLAMA_BUILD=OFF); its llama_cpp/lib is a
#   link to the libraries above;
# - bench/.venvs/ggufconvert: a venv for convert_hf_to_gguf.py that sees llmzip's packages
#   (torch, transformers) through a .pth file and adds mistral-common and sentencepiece.
# For bench/gguf_llamacpp.py and bench/serve.py (llamacpp:).
# JOBS=N sets the build's parallelism (default 2).
set -euo pipefail
cd "$(dirname "$0")"
VERSION=0.3.16
V=.venvs
mkdir -p $V/src $V/llamacpp-src
[ -f $V/src/llama_cpp_python-$VERSION.tar.gz ] || \
  python3 -m pip download --no-deps --no-binary :all: -d $V/src "llama-cpp-python==$VERSION"
PKG=$V/llamacpp-src/llama_cpp_python-$VERSION
[ -d $PKG ] || tar -xzf $V/src/llama_cpp_python-$VERSION.tar.gz -C $V/llamacpp-src
cmake -S "$PKG/vendor/llama.cpp" -B $V/llamacpp-tools -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_CURL=OFF
nice -n 19 cmake --build $V/llamacpp-tools -j "${JOBS:-2}" --target llama-quantize llama-imatrix llama-perplexity
if [ ! -x $V/llamacpp/bin/python ]; then
  python3 -m venv $V/llamacpp
  $V/llamacpp/bin/pip install -q --upgrade pip
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" nice -n 19 $V/llamacpp/bin/pip install -q --no-cache-dir \
    "$PKG[server]"
fi
site=$($V/llamacpp/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf "$site/llama_cpp/lib"
ln -s "$PWD/$V/llamacpp-tools/bin" "$site/llama_cpp/lib"
$V/llamacpp/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'loads')"
if [ ! -x $V/ggufconvert/bin/python ]; then
  python3 -m venv $V/ggufconvert
  site=$($V/ggufconvert/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  ../.venv/bin/python -c "import sys; print('\\n'.join(p for p in sys.path if p.endswith('site-packages')))" \
    > "$site/llmzip_env.pth"
  $V/ggufconvert/bin/python -m pip install -q --no-deps mistral-common
  $V/ggufconvert/bin/python -m pip install -q jsonschema "pydantic-extra-types[pycountry]" tiktoken sentencepiece
fi
