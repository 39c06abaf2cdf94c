#!/usr/bin/env bash
# One script for a GPU machine: build the extension there, run the CUDA tests and the GPU benchmarks,
# and leave every result in one folder (default benchmarks/results/gpu). When $OUT is set (the device
# tool's return folder, which takes at most 8 files) the folder is also packed into $OUT/gpu_check.tar.gz,
# with the Markdown tables and the test log beside it.
# Budget: GPU_CHECK_BUDGET seconds in all (default 540, under the device tool's 600 s per command): each
# step's timeout is cut to what is left, so the results are always packed and come back.
# Usage: bash benchmarks/gpu_check.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
status=0
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-540} - 20))   # 20 s kept for packing the results
left() { local t=$1 rem=$((deadline - SECONDS)); (( rem < t )) && t=$rem; (( t < 1 )) && t=1; echo $t; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
} > "$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"

echo "== build (log: build.log)"
# Offline: no build isolation, no dependency resolution; the arch list comes from the visible GPU.
if ! timeout $(left 300) $PY -m pip install --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1; then
  echo "build failed:"; tail -20 "$RESULTS/build.log"; status=1
fi
grep "rmfast build:" "$RESULTS/build.log" | tail -1
$PY -m rmfast.env > "$RESULTS/env.txt" 2>&1; cat "$RESULTS/env.txt"

echo "== CUDA tests (log: tests.log)"
timeout $(left 240) $PY -m pytest -q tests -k "cuda" -p no:cacheprovider > "$RESULTS/tests.log" 2>&1 || status=1
tail -5 "$RESULTS/tests.log"

echo "== GPU benchmark"
timeout $(left 270) $PY benchmarks/bench_loss.py --device cuda --repeats 50 --warmup 5 --out "$RESULTS" || status=1

echo "== a few training steps of each layout and attention on the GPU (log: train.log)"
for run in padded:auto packed:varlen prefix_shared:varlen prefix_shared:flex; do
  layout=${run%%:*}; attn=${run##*:}
  timeout $(left 120) $PY -m rmfast.cli --demo --train.output_dir "/tmp/rmfast-gpu-$layout-$attn" --train.layout $layout \
    --train.attention $attn --train.max_steps 30 --train.eval_every 0 --model.dtype bf16 >> "$RESULTS/train.log" 2>&1 || status=1
  grep -E "layout:|final eval" "$RESULTS/train.log" | tail -2
done

echo "== training throughput on the GPU, larger model (bench_train_cuda*.*): varlen, then flex"
timeout $(left 200) $PY benchmarks/bench_train.py --device cuda --dtype bf16 --hidden 1024 --layers 8 --steps 10 \
  --out "$RESULTS" || status=1
timeout $(left 150) $PY benchmarks/bench_train.py --device cuda --dtype bf16 --hidden 1024 --layers 8 --steps 10 \
  --attention flex --contenders rmfast-packed,rmfast-prefix --tag cuda_flex --out "$RESULTS" || status=1

if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu_check.tar.gz" -C "$RESULTS" .
  cp "$RESULTS"/*.md "$RESULTS/tests.log" "$OUT/" 2>/dev/null
fi
echo "results in $RESULTS (exit $status)"
exit $status
