#!/usr/bin/env bash
# The device check, run on a lent GPU machine (see README "GPU"): build from this tree with the
# machine's own torch, run the CUDA tests and the op benchmark on the GPU, logs under $OUT.
#   device tool: run `bash benchmarks/gpu_check.sh` with timeout_s ~ 420
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/machine.txt" 2>&1
pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
cd /tmp  # import the installed package, not the source tree
python -m pytest -q -x -k "Cuda or cuda" "$OLDPWD/tests/test_ops.py" > "$OUT/pytest_cuda.log" 2>&1
echo "cuda tests rc=$?" | tee -a "$OUT/machine.txt"
python "$OLDPWD/benchmarks/bench_ops.py" --device cuda --threads 16 > "$OUT/bench_gpu.md" 2>&1
echo "bench rc=$?" | tee -a "$OUT/machine.txt"
tail -5 "$OUT/pytest_cuda.log"; cat "$OUT/bench_gpu.md"
