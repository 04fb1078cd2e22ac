#!/usr/bin/env bash
# Every GPU test and benchmark in one call of at most ~8 minutes, for a session that has a
# CUDA machine (the `device` tool). Writes results under $OUT (or bench/results/gpu when
# unset); bench/results/gpu.md summarises the last runs.
#   bench/gpu.sh                   # default parts: tests kernels serve (<= 8.5 min in all:
#                                  # set-up ~20 s, tests <= 100 s, kernels <= 180 s, serve <= 200 s)
#   bench/gpu.sh tests kernels     # some parts
#   TESTS_K="w4a8" KERNEL_SHAPES=1 TESTS_TIMEOUT_S=60 KERNELS_TIMEOUT_S=150 bench/gpu.sh tests kernels
#                                  # a short check: some tests, one shape (8192 x 8192)
#   SERVE_LAYERS=32 bench/gpu.sh serve   # the full 32-layer 8B shape (default 8 layers; ~6 min alone)
#   DECODE_LAYERS=8 bench/gpu.sh kernels # also one captured decode step, W4 vs fp16
#   bench/gpu.sh variants          # tuning aid: bench/qmm_variants.py on 8192 x 8192
# The device image has torch + triton (and pytest, accelerate, safetensors, tokenizers,
# huggingface_hub) but no network. Prepare the rest here once with bench/gpu_prepare.sh:
# Python 3.12 wheels in bench/.wheels, gemlite's package folder in bench/.wheels/peers (put on
# PYTHONPATH below), the serve part's tokenizer in bench/.work/tokenizer; then pass
# carry=["bench/.wheels", "bench/.work/tokenizer"].
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
PARTS="${*:-tests kernels serve}"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)
# Install into the interpreter's environment; where that is read-only, into /tmp/site
# (a sitecustomize there reads the editable install's .pth).
if ! { if ls bench/.wheels/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --no-deps bench/.wheels/*.whl; fi &&
       $PY -m pip install -q --no-deps --no-build-isolation -e .; }; then
  if ls bench/.wheels/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --no-deps --target /tmp/site bench/.wheels/*.whl; fi
  $PY -m pip install -q --no-deps --no-build-isolation --target /tmp/site -e .
  echo 'import site; site.addsitedir("/tmp/site")' > /tmp/site/sitecustomize.py
  export PYTHONPATH=/tmp/site
fi
if [ -d bench/.wheels/peers ]; then  # gemlite (an sdist: its package folder, carried as is)
  export PYTHONPATH="$PWD/bench/.wheels/peers${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import torch, triton, transformers, llmzip.kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/device.txt"
for part in $PARTS; do
  echo "== $part ($(( $(date +%s) - T0 )) s so far)"
  case "$part" in
    tests)    # CUDA correctness: calibration, Triton qmm paths, W4A8, paged decode attention, engine
      # default kernel configs here (autotuning every parametrized case would take minutes);
      # bench/kernels_gpu.py checks the tuned configs against the references on every shape
      TRITON_INTERPRET=0 LLMZIP_AUTOTUNE=0 timeout "${TESTS_TIMEOUT_S:-100}" $PY -m pytest -q -m gpu tests/test_gpu.py \
        ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
        | tee "$OUT/pytest_gpu.txt" || true ;;
    kernels)  # W4 (and W4A8) vs cuBLAS fp16 with tinygemm, gemlite and fp8 cuBLAS rows
      timeout "${KERNELS_TIMEOUT_S:-180}" $PY bench/kernels_gpu.py --shapes "${KERNEL_SHAPES:-4}" \
        --budget-s "${KERNELS_BUDGET_S:-100}" \
        --decode-layers "${DECODE_LAYERS:-0}" --out "$OUT" 2>&1 | tee "$OUT/kernels.txt" || true ;;
    serve)    # llmzip serve: Llama-3-8B-shaped random model, fp16 vs W4 g128, 1/16/64 streams
      layers="${SERVE_LAYERS:-8}"
      if timeout 40 $PY bench/random_model.py -o bench/.work/rand8b --tokenizer bench/.work/tokenizer \
           --layers "$layers" && timeout 40 $PY -m llmzip quantize bench/.work/rand8b --method rtn --bits 4 \
           --group-size 128 -o bench/.work/rand8b-w4g128 --device cuda; then
        timeout "${SERVE_TIMEOUT_S:-120}" $PY bench/serve.py --target llmzip:bench/.work/rand8b \
          --target llmzip:bench/.work/rand8b-w4g128 --streams 1,16,64 --requests-per-stream 2 --max-tokens 64 \
          --out "$OUT/serve_gpu" 2>&1 | tee "$OUT/serve.txt" || true
      else
        echo "serve: the random model or its W4 checkpoint was not made in time" | tee "$OUT/serve.txt"
      fi ;;
    variants) # a tuning aid, not in the default parts: kernel variants on one shape
      timeout 540 $PY bench/qmm_variants.py --out "$OUT/variants.json" 2>&1 | tee "$OUT/variants.txt" || true ;;
    *) echo "unknown part $part (tests, kernels, serve, variants)" >&2; exit 2 ;;
  esac
done
echo "== done in $(( $(date +%s) - T0 )) s"
