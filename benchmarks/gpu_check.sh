#!/usr/bin/env bash
# The device check, run on a lent GPU machine (see README "GPU"): build from this tree with the
# machine's own torch, run the CUDA tests and the benchmarks on the GPU, logs under $OUT.
#   device tool: run `bash benchmarks/gpu_check.sh` with timeout_s ~ 500
# Every step after the build runs under `timeout`, bounded by what is left of an 8-minute budget
# (BUDGET_S, default 470 s), so the whole check ends in under 8 minutes; a step with under 20 s left
# is skipped (its log says so). Benchmarks print Markdown tables to their logs (no RESULTS.md writes).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"
SRC=$PWD
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/machine.txt" 2>&1
pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
cd /tmp  # import the installed package, not the source tree

# bounded NAME LIMIT_S CMD...: run CMD with stdout+stderr to $OUT/NAME.log, for at most LIMIT_S seconds
# and never past the budget.
bounded() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "skipped: ${left}s of the budget left" > "$OUT/$name.log"
    echo "$name skipped (budget)" | tee -a "$OUT/machine.txt"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? (limit ${limit}s, at ${SECONDS}s)" | tee -a "$OUT/machine.txt"
}

bounded pytest_cuda 90 python -m pytest -q -x -k "Cuda or cuda" "$SRC/tests/test_ops.py" "$SRC/tests/test_lora_forward.py" \
  "$SRC/tests/test_sst.py"
bounded bench_gpu 60 python "$SRC/benchmarks/bench_ops.py" --device cuda --threads 16
cp "$OUT/bench_gpu.log" "$OUT/bench_gpu.md" 2>/dev/null
# LoRALinear vs PEFT vs nn.Linear: d 768..4096, r 16/64/256, 8192 tokens, bf16 autocast
bounded bench_lora_layer_cuda 75 python "$SRC/benchmarks/bench_lora_layer.py" --device cuda
# a whole step of a LLaMA-130M-shaped model, eager (5 methods) and compiled (full rank and ReLoRA*)
bounded bench_step_cuda 170 python "$SRC/benchmarks/bench_step.py" --device cuda --compile \
  --methods full peft relora relora_bf16w sst --compile-methods full relora
# train_lm on the GPU preset (25.2M parameters, 9.8M tokens), full vs PEFT LoRA vs ReLoRA*
bounded train_lm_cuda 120 python "$SRC/benchmarks/train_lm.py" --device cuda --preset gpu \
  --methods full peft_lora relora --stage all --cache-dir "$OUT/train_lm_cuda" \
  --plot "$OUT/train_lm_cuda.png" --no-write-results
# SST on the same preset (full rank from the cache of the step above), last: only if the budget has room left
bounded train_lm_cuda_sst 60 python "$SRC/benchmarks/train_lm.py" --device cuda --preset gpu \
  --methods full sst --stage all --cache-dir "$OUT/train_lm_cuda" --plot "$OUT/train_lm_cuda_sst.png" \
  --no-write-results
tail -5 "$OUT/pytest_cuda.log"
for f in bench_gpu bench_lora_layer_cuda bench_step_cuda train_lm_cuda train_lm_cuda_sst; do
  echo "== $f"; grep -E '^\||^## ' "$OUT/$f.log" | head -60
done
