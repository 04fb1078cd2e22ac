#!/usr/bin/env bash
# Prepares, on a machine with network, what bench/gpu.sh needs on a GPU machine without it:
#   bench/.wheels/*.whl        Python 3.12 x86-64 wheels of the packages the device image lacks
#                              (or has in other versions), pinned to this checkout's venv;
#   bench/.wheels/peers/gemlite  gemlite 0.6.0.post2's package folder (published as an sdist
#                              only; pure Python + Triton), put on PYTHONPATH by bench/gpu.sh;
#   bench/.work/tokenizer      the tokenizer of the serve part's random 8B-shaped model.
# Then carry=["bench/.wheels", "bench/.work/tokenizer"] with the `run` call (about 20 MiB).
#   bench/gpu_prepare.sh [DEST]     # DEST: a checkout root to fill (default: this one)
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$SRC}"
PY="${PYTHON:-$SRC/.venv/bin/python}"
W="$DEST/bench/.wheels"
mkdir -p "$W/peers" "$DEST/bench/.work"
pin() {  # NAME==VERSION as installed here, or NAME when it is not
  local v
  v=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1")
  if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}
PKGS=""
for p in transformers compressed-tensors loguru pydantic pydantic-core annotated-types typing-inspection \
         typing-extensions gguf fastapi starlette annotated-doc opentelemetry-api uvicorn anyio h11 regex \
         huggingface-hub tokenizers safetensors accelerate; do
  PKGS="$PKGS $(pin "$p")"
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$W" $PKGS
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary :all: gemlite==0.6.0.post2 -d "$tmp"
tar -xzf "$tmp"/gemlite-0.6.0.post2.tar.gz -C "$tmp"
rm -rf "$W/peers/gemlite" && cp -r "$tmp/gemlite-0.6.0.post2/gemlite" "$W/peers/gemlite"
rm -rf "$tmp"
(cd "$SRC" && "$PY" bench/random_model.py --export-tokenizer "$DEST/bench/.work/tokenizer")
du -sh "$W" "$DEST/bench/.work/tokenizer"
