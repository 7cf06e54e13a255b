#!/usr/bin/env bash
# Everything the GPU machine checks, in one go (logs and JSON under $OUT):
#   1. the gpu test tier; 2. the throughput benchmark (uncapped and T4-capped);
#   3. `qlora-ray submit` of a TinyLlama-shaped spec with fp16 compute.
# Usage on a GPU machine with qlora-ray installed:  OUT=/tmp/out bash benchmarks/gpu_run.sh [TOKENIZER_DIR]
set -uo pipefail
OUT=${OUT:-/tmp/qlora-gpu-out}; mkdir -p "$OUT"
TOK=${1:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ "${SKIP_TESTS:-0}" = 1 ] || python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --durations=0 2>&1 | tail -n 25 | tee "$OUT/gpu_tests.log"
python benchmarks/throughput.py --out "$OUT" --t4 2>&1 | grep -v "^WARNING\|it/s\]" | tail -n 20 | tee "$OUT/throughput_t4.log"
if [ -n "$TOK" ]; then
  python benchmarks/make_model.py /tmp/tinyllama-rand --tokenizer "$TOK" >/dev/null
  start=$(date +%s)
  python -m qlora_ray submit benchmarks/tinyllama_gpu.yaml output.dir=/tmp/gpu-runs --no-dashboard \
    > "$OUT/submit_gpu.log" 2>&1
  echo "submit rc=$? wall_s=$(( $(date +%s) - start ))" | tee -a "$OUT/submit_gpu.log"
  tail -n 30 "$OUT/submit_gpu.log"
  cp /tmp/gpu-runs/tinyllama_gpu/leaderboard.md "$OUT/" 2>/dev/null
fi
