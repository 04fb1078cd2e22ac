#!/usr/bin/env bash
# Every GPU test and benchmark, for a session that has a CUDA machine (the `device`
# tool). Writes results under $OUT (or bench/results/gpu when unset).
#   bench/gpu.sh                   # all parts: tests kernels serve
#   bench/gpu.sh tests kernels     # some parts (one device call is capped at 10 minutes;
#                                  # split the parts over calls if all of them do not fit)
# The device image has torch + triton preinstalled and no network: carry the other
# dependencies as wheels (here: `pip download -d bench/.wheels transformers accelerate
# safetensors compressed-tensors huggingface_hub tqdm gguf pytest fastapi uvicorn
# starlette pydantic pydantic-core annotated-types typing-inspection anyio sniffio h11
# click prometheus_client --no-deps`) and, for the serve part, the tokenizer files
# (`python bench/random_model.py --export-tokenizer bench/.work/tokenizer`); pass
# carry=["bench/.wheels", "bench/.work/tokenizer"] to the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
PARTS="${*:-tests kernels serve}"
mkdir -p "$OUT"
if [ -d bench/.wheels ]; then python -m pip install -q --no-index --no-deps bench/.wheels/*.whl; fi
python -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
for part in $PARTS; do
  case "$part" in
    tests)    # CUDA correctness of calibration, Triton qmm and paged decode attention
      TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/pytest_gpu.txt" ;;
    kernels)  # Triton W4 vs cuBLAS fp16 on 8B/70B shapes; 8B-shaped decode
      python bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.txt" ;;
    serve)    # llmzip serve: Llama-3-8B-shaped random model, fp16 vs W4 g128, 1/16/64 streams
      python bench/random_model.py -o bench/.work/rand8b --tokenizer bench/.work/tokenizer
      python -m llmzip quantize bench/.work/rand8b --method rtn --bits 4 --group-size 128 \
        -o bench/.work/rand8b-w4g128 --device cuda
      python bench/serve.py --target llmzip:bench/.work/rand8b --target llmzip:bench/.work/rand8b-w4g128 \
        --streams 1,16,64 --requests-per-stream 2 --max-tokens 64 --out "$OUT/serve_gpu" 2>&1 | tee "$OUT/serve.txt" ;;
    *) echo "unknown part $part (tests, kernels, serve)" >&2; exit 2 ;;
  esac
done
