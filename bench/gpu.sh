#!/usr/bin/env bash
# Every GPU test and benchmark, for a session that has a CUDA machine (the `device`
# tool). Writes results under $OUT (or bench/results/gpu when unset); bench/results/gpu.md
# summarises the last runs.
#   bench/gpu.sh                   # all parts: tests kernels serve
#   bench/gpu.sh tests kernels     # some parts (one device call is capped at 10 minutes:
#                                  # tests ~2 min, kernels ~6 min, serve ~5-8 min)
#   SERVE_LAYERS=8 bench/gpu.sh serve   # fewer decoder layers in the 8B-shaped model
#   bench/gpu.sh variants          # tuning aid: bench/qmm_variants.py on 8192 x 8192
# The device image has torch + triton (and pytest, accelerate, safetensors, tokenizers,
# huggingface_hub) but no network: carry the rest as Python 3.12 wheels in bench/.wheels
# (`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux2014_x86_64 -d bench/.wheels transformers==<ours> compressed-tensors loguru
# pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf fastapi
# starlette annotated-doc opentelemetry-api uvicorn anyio h11 regex`) and, for the serve
# part, the tokenizer files (`python bench/random_model.py --export-tokenizer
# bench/.work/tokenizer`); pass carry=["bench/.wheels", "bench/.work/tokenizer"].
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
PARTS="${*:-tests kernels serve}"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# Install into the interpreter's environment; where that is read-only, into /tmp/site
# (a sitecustomize there reads the editable install's .pth).
if ! { if [ -d bench/.wheels ]; then $PY -m pip install -q --no-index --no-deps bench/.wheels/*.whl; fi &&
       $PY -m pip install -q --no-deps --no-build-isolation -e .; }; then
  if [ -d bench/.wheels ]; then $PY -m pip install -q --no-index --no-deps --target /tmp/site bench/.wheels/*.whl; fi
  $PY -m pip install -q --no-deps --no-build-isolation --target /tmp/site -e .
  echo 'import site; site.addsitedir("/tmp/site")' > /tmp/site/sitecustomize.py
  export PYTHONPATH=/tmp/site
fi
$PY -c "import torch, triton, transformers, llmzip.kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/device.txt"
for part in $PARTS; do
  case "$part" in
    tests)    # CUDA correctness of calibration, Triton qmm and paged decode attention
      # default kernel configs here (autotuning every parametrized case would take minutes);
      # bench/kernels_gpu.py checks the tuned configs against the reference on every shape
      TRITON_INTERPRET=0 LLMZIP_AUTOTUNE=0 timeout 300 $PY -m pytest -q -m gpu tests/test_gpu.py 2>&1 \
        | tee "$OUT/pytest_gpu.txt" || true ;;
    kernels)  # Triton W4 vs cuBLAS fp16 on 8B/70B shapes; 8B-shaped decode
      timeout 420 $PY bench/kernels_gpu.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt" || true ;;
    serve)    # llmzip serve: Llama-3-8B-shaped random model, fp16 vs W4 g128, 1/16/64 streams
      $PY bench/random_model.py -o bench/.work/rand8b --tokenizer bench/.work/tokenizer ${SERVE_LAYERS:+--layers $SERVE_LAYERS}
      $PY -m llmzip quantize bench/.work/rand8b --method rtn --bits 4 --group-size 128 \
        -o bench/.work/rand8b-w4g128 --device cuda
      timeout 480 $PY bench/serve.py --target llmzip:bench/.work/rand8b --target llmzip:bench/.work/rand8b-w4g128 \
        --streams 1,16,64 --requests-per-stream 2 --max-tokens 64 --out "$OUT/serve_gpu" 2>&1 | tee "$OUT/serve.txt" || true ;;
    variants) # a tuning aid, not in the default parts: kernel variants on one shape
      timeout 540 $PY bench/qmm_variants.py --out "$OUT/variants.json" 2>&1 | tee "$OUT/variants.txt" || true ;;
    *) echo "unknown part $part (tests, kernels, serve, variants)" >&2; exit 2 ;;
  esac
done
