#!/usr/bin/env bash
# The GPU check, for the lent GPU machine (one H100 / H200, no network, python3 = 3.12 with torch, triton and
# transformers, but no deepspeed, datasets, pydantic, hjson; see benchmarks/carry_wheels.sh, which fills the
# carry folder .whl/ with their wheels and the HH-RLHF sample). Stages, in order, each under its own timeout
# cut to what is left of one overall budget (GPU_CHECK_BUDGET seconds, default 410: under 7 minutes):
#   env         GPU, driver, versions; installs the carried wheels (offline) and import-checks them
#   build       the extension for the visible GPU only (TORCH_CUDA_ARCH_LIST from nvidia-smi), pip -e
#   tests       the CUDA tests against the float64 reference (pytest -k cuda: loss, backends, layouts, groups)
#   smoke       20 bf16 steps of a tiny Llama on synthetic pairs through `python3 -m rmfast.cli`, for each of
#               padded, packed+varlen, prefix_shared+varlen, prefix_shared+flex (in parallel): loss falls?
#   bench_train end to end on the HH sample, a 134M-parameter Llama: DeepSpeed-Chat-style, TRL-style,
#               rmfast padded / packed / prefix_shared and the real Trainer, same batches
#   mfu         benchmarks/bench_mfu.py: a 1B Llama-shaped reward model, prefix_shared + varlen, MFU
#   bench_loss  the fused loss microbenchmark (a few shapes, no torch.compile)
# Every stage writes its results the moment it ends, so a run cut off still returns each finished stage.
# Results (8 files at most, the device tool's limit) go to $OUT when set, else to DIR (default
# benchmarks/results/gpu): summary.md (one line per stage: status, seconds, result), env.txt, build.log,
# tests.log, train.log, bench.md (the benchmarks' tables), bench.log (their output), bench.csv.
#
# --dry-run runs every stage on CPU with tiny sizes (no wheels, no build: CI built the extension; segments
# attention for varlen / flex, fp32, 2-3 steps, TRITON_INTERPRET=1), so that CI keeps the script working
# (tests/test_gpu_check.py). Budget there: GPU_CHECK_BUDGET, default 600.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [DIR]
# On the device tool: carry [".whl"], command `bash benchmarks/gpu_check.sh`, timeout_s 480.
set -uo pipefail
{ # the whole script is one block: bash reads it all before running it, so editing the file meanwhile is safe
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
DIR=""
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) DIR=$a ;;
  esac
done
if [ -n "${OUT:-}" ]; then R=$OUT; else R=${DIR:-benchmarks/results/gpu}; fi
mkdir -p "$R"
R=$(cd "$R" && pwd)
if (( DRY )); then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  BUDGET=${GPU_CHECK_BUDGET:-600}
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  PY=${PYTHON:-python3}
  BUDGET=${GPU_CHECK_BUDGET:-410}
fi
case $PY in /*) ;; */*) PY=$ROOT/$PY ;; *) PY=$(command -v "$PY") ;; esac   # absolute, symlinks kept (a venv)
W=$(mktemp -d /tmp/rmfast-gpu-check.XXXXXX)
DATA=${RMFAST_HH_SAMPLE:-}
[ -z "$DATA" ] && for d in ../shared/data/hh-rlhf-harmless-sample.jsonl.gz .whl/data/hh-rlhf-harmless-sample.jsonl.gz; do
  [ -f "$d" ] && { DATA=$ROOT/$d; break; }
done
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PY W R ROOT DRY DATA
deadline=$((SECONDS + BUDGET - 10))   # 10 s kept for the last summary lines
left() { local t=$1 rem=$((deadline - SECONDS)); (( rem < t )) && t=$rem; (( t < 0 )) && t=0; echo $t; }

printf '# gpu_check %s\n\n%s, budget %s s%s\n\n| stage | status | seconds | result |\n|---|---|---|---|\n' \
  "$(git rev-parse --short HEAD 2>/dev/null)" "$(date -u +%FT%TZ)" "$BUDGET" "$( ((DRY)) && echo ', DRY RUN (CPU, tiny sizes)')" \
  > "$R/summary.md"
: > "$R/bench.md"; : > "$R/bench.log"; : > "$R/bench.csv"; : > "$R/train.log"; : > "$R/tests.log"
: > "$R/build.log"

# run_stage NAME CAP FUNCTION: the function runs under `timeout`, writes its one-line result to
# $W/result.NAME, and fails (non-zero) when its results are missing; the summary line is written at once.
run_stage() {
  local name=$1 cap=$2 fn=$3 t start rc status
  t=$(left "$cap")
  if (( t < 5 )); then
    echo "| $name | SKIPPED (no time left) | 0 | |" >> "$R/summary.md"; echo "== $name: skipped, no time left"; return
  fi
  echo "== $name (timeout ${t} s)"
  start=$SECONDS
  timeout -k 10 "$t" bash -c "$fn"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${t} s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  local result; result=$(tr '\n|' ' /' < "$W/result.$name" 2>/dev/null)
  echo "| $name | $status | $((SECONDS - start)) | ${result:-} |" >> "$R/summary.md"
  echo "== $name: $status in $((SECONDS - start)) s: ${result:-}"
}

stage_env() {
  {
    date -u
    echo "dry run: $DRY; python: $PY; data: ${DATA:-MISSING}"
    uname -a
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || echo "no nvidia-smi"
    if (( ! DRY )); then
      if ls .whl/*.whl >/dev/null 2>&1; then
        echo "== installing the carried wheels into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
          && echo "installed: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
      else
        echo "NO CARRIED WHEELS (.whl/): deepspeed and friends will be missing (run benchmarks/carry_wheels.sh here, carry .whl)"
      fi
    fi
    "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
names = ["torch", "triton", "transformers", "tokenizers", "accelerate", "peft", "deepspeed", "datasets", "pydantic",
         "pydantic_core", "hjson", "dill", "multiprocess", "trl", "pyarrow", "pandas", "fsspec", "huggingface_hub",
         "numpy", "typing_extensions", "einops", "msgpack", "cpuinfo", "ninja", "xxhash", "flash_attn"]
bad = []
for n in names:
    try:
        m = importlib.import_module(n)
        v = getattr(m, "__version__", None) or md.version({"cpuinfo": "py-cpuinfo"}.get(n, n.replace("_", "-")))
        print(f"{n:18} {v}  ({getattr(m, '__file__', '') or ''})")
    except Exception as exc:  # noqa: BLE001
        print(f"{n:18} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
        if n in ("torch", "transformers", "deepspeed", "pydantic", "hjson", "datasets"):
            bad.append(n)
import torch
print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(1 if bad else 0)
EOF
  } > "$R/env.txt" 2>&1
  local ok=$?
  cat "$R/env.txt"
  local gpu; gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  echo "${gpu:-no GPU}; $(grep -E '^(torch|triton|transformers|deepspeed) +[0-9]' "$R/env.txt" | awk '{print $1, $2}' | tr '\n' ' ')" \
    > "$W/result.env"
  return $ok
}

stage_build() {
  if (( DRY )); then
    echo "dry run: no build (the extension was built by make / CI)" > "$R/build.log"
  else
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    [ -z "$cap" ] && cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    echo "TORCH_CUDA_ARCH_LIST=$cap" > "$R/build.log"
    # offline: no build isolation, no index, no dependencies; editable so that rmfast.kernels maps to kernels/
    if ! TORCH_CUDA_ARCH_LIST=$cap MAX_JOBS=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
        >> "$R/build.log" 2>&1; then
      echo "pip install -e failed; trying setup.py build_ext --inplace" >> "$R/build.log"
      TORCH_CUDA_ARCH_LIST=$cap MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace >> "$R/build.log" 2>&1 || return 1
    fi
  fi
  # from /tmp: the installed rmfast, not the source tree's folder by accident
  (cd /tmp && "$PY" -m rmfast.env) >> "$R/build.log" 2>&1
  local rc=$?
  { grep -m1 "rmfast build:" "$R/build.log" | sed 's/.*rmfast build: //' | cut -c1-90; grep -E "^extension" "$R/build.log"; } \
    | tr '\n' ';' > "$W/result.build"
  return $rc
}

stage_tests() {
  local extra=()
  if (( ! DRY )); then
    "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
  fi
  "$PY" -m pytest -q -p no:cacheprovider -rfE "${extra[@]}" -k cuda \
    tests/test_pairwise_loss.py tests/test_backends.py tests/test_layouts.py tests/test_groups.py > "$R/tests.log" 2>&1
  local rc=$?
  tail -1 "$R/tests.log" | tr -d '=' | sed 's/^ *//' > "$W/result.tests"
  grep -qE "passed|skipped" "$R/tests.log" || return 1
  return $rc
}

stage_smoke() {
  local demo=$W/demo steps=20 dtype=bf16 n=3000 runs=(padded:auto packed:varlen prefix_shared:varlen prefix_shared:flex)
  # dry run: CPU maps varlen and flex to segments (varlen is refused on CPU, flex trains only on CUDA), so
  # prefix_shared+flex would repeat prefix_shared+varlen; one thread each, the runs share two cores
  (( DRY )) && { steps=3; dtype=fp32; n=200; runs=(padded:auto packed:varlen prefix_shared:varlen); }
  "$PY" -c "from rmfast.cli import demo_setup; demo_setup('$demo', pairs=$n)" >> "$R/train.log" 2>&1 || return 1
  if (( DRY )); then head -64 "$demo/demo-data/eval.jsonl" > "$demo/eval-small.jsonl"; else cp "$demo/demo-data/eval.jsonl" "$demo/eval-small.jsonl"; fi
  local pids=() run layout attn
  for run in "${runs[@]}"; do
    layout=${run%%:*}; attn=${run##*:}
    (( DRY )) && [ "$attn" != auto ] && attn=segments   # varlen is refused on CPU, flex trains only on CUDA
    local args=(--model.name_or_path "$demo/demo-model" --data.train "$demo/demo-data/train.jsonl"
      --data.eval "$demo/eval-small.jsonl" --data.max_length 256 --data.cache_dir "$W/cache-$layout-${run##*:}"
      --train.output_dir "$W/smoke-$layout-${run##*:}" --train.layout "$layout" --train.attention "$attn"
      --model.dtype "$dtype" --train.max_steps "$steps" --train.pairs_per_batch 32 --train.lr 2e-3
      --train.warmup_ratio 0.05 --train.weight_decay 0 --train.use_margin false --train.log_every 1
      --train.eval_every 0 --train.save_every 0 --train.export false --train.tensorboard false)
    # in parallel: tiny models, mostly start-up and compile time
    if (( DRY )); then
      OMP_NUM_THREADS=1 "$PY" -m rmfast.cli "${args[@]}" > "$W/smoke-$layout-${run##*:}.log" 2>&1 &
    else
      "$PY" -m rmfast.cli "${args[@]}" > "$W/smoke-$layout-${run##*:}.log" 2>&1 &
    fi
    pids+=($!)
  done
  local fails=0 pid; for pid in "${pids[@]}"; do wait "$pid" || fails=$((fails + 1)); done
  : > "$W/result.smoke"
  for run in "${runs[@]}"; do
    layout=${run%%:*}; attn=${run##*:}
    { echo "===== $layout + $attn ($dtype, $steps steps)"; cat "$W/smoke-$layout-$attn.log"; } >> "$R/train.log"
    "$PY" - "$W/smoke-$layout-$attn" "$run" >> "$W/result.smoke" <<'EOF' || fails=$((fails + 1))
import json, os, sys
from pathlib import Path
out, run = Path(sys.argv[1]), sys.argv[2]
try:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
except OSError:
    print(f"{run}: no metrics;"); sys.exit(1)
train = [r for r in recs if "loss" in r]
evals = [r for r in recs if "eval_loss" in r]
if not train or len(evals) < 2:
    print(f"{run}: incomplete ({len(train)} steps, {len(evals)} evals);"); sys.exit(1)
k = max(1, min(3, len(train) // 3))  # mean of the first and of the last few steps
first, last = sum(r["loss"] for r in train[:k]) / k, sum(r["loss"] for r in train[-k:]) / k
fell = evals[-1]["eval_loss"] < evals[0]["eval_loss"]
tok = train[-1].get("tokens_per_s", 0)
print(f"{run}: loss {first:.3f}→{last:.3f}, eval loss {evals[0]['eval_loss']:.3f}→{evals[-1]['eval_loss']:.3f} "
      f"({'fell' if fell else 'DID NOT FALL'}), eval acc {evals[0]['eval_accuracy']:.2f}→{evals[-1]['eval_accuracy']:.2f}, "
      f"{tok:.0f} tok/s;")
sys.exit(0 if fell or os.environ.get("DRY") == "1" else 1)  # on the GPU, 20 steps must lower the eval loss
EOF
  done
  cat "$W/result.smoke" >> "$R/train.log"
  return $fails
}

stage_bench_train() {
  local args tag rc=0 fails=0
  if (( DRY )); then
    args=(--device cpu --hidden 64 --layers 2 --vocab 500 --pairs 4 --steps 2 --warmup 1) tag=dryrun
  else
    # 18 layers of 768: 127M parameters outside the embeddings, 134M in all with the 8,000-token BPE
    args=(--device cuda --dtype bf16 --hidden 768 --layers 18 --vocab 8000 --pairs 8 --steps 8 --warmup 2) tag=cuda
  fi
  : > "$W/result.bench_train"
  # two invocations: a contender that breaks (bench_train stops at the first) costs only its own line;
  # rmfast-prefix is in the first, the speed-ups are against it
  local part contenders
  for part in main padded; do
    contenders=dschat,trl,rmfast-packed,rmfast-prefix,rmfast-trainer
    [ $part = padded ] && contenders=rmfast-padded
    "$PY" benchmarks/bench_train.py "${args[@]}" --contenders $contenders --tag "${tag}_$part" --data "$DATA" \
      --out "$W/bench" >> "$R/bench.log" 2>&1 || fails=$((fails + 1))
    if [ -f "$W/bench/bench_train_${tag}_$part.md" ]; then
      cat "$W/bench/bench_train_${tag}_$part.md" >> "$R/bench.md"; echo >> "$R/bench.md"
      { echo "# bench_train_${tag}_$part.csv"; cat "$W/bench/bench_train_${tag}_$part.csv"; echo; } >> "$R/bench.csv"
      grep -E "^\| (rmfast-prefix|rmfast-padded|dschat|trl) " "$W/bench/bench_train_${tag}_$part.md" \
        | awk -F'|' '{printf "%s%s pairs/s;", $2, $3}' >> "$W/result.bench_train"
    else
      echo " $contenders FAILED (bench.log);" >> "$W/result.bench_train"
    fi
  done
  return $fails
}

stage_mfu() {
  local args=()
  (( DRY )) && args=(--tiny --device cpu --tag dryrun) || args=(--tag cuda)
  "$PY" benchmarks/bench_mfu.py "${args[@]}" --data "$DATA" --out "$W/bench" >> "$R/bench.log" 2>&1
  local rc=$? tag=${args[-1]}
  [ -f "$W/bench/bench_mfu_$tag.md" ] || return 1
  cat "$W/bench/bench_mfu_$tag.md" >> "$R/bench.md"; echo >> "$R/bench.md"
  { echo "# bench_mfu_$tag.csv"; cat "$W/bench/bench_mfu_$tag.csv"; echo; } >> "$R/bench.csv"
  "$PY" -c "
import csv, sys
r = next(csv.DictReader(open(sys.argv[1])))
print(f\"{r['model']} {r['non_embedding_params_m']}M, {r['tokens_per_step']} tok/step, {r['step_s']} s/step, \"
      f\"{r['tokens_per_s']} tok/s, MFU {float(r['mfu']) * 100:.1f}% ({float(r['mfu_with_attention']) * 100:.1f}% with \"
      f\"attention), peak {r['peak_mem_gib'] or 'n/a'} GiB\")" "$W/bench/bench_mfu_$tag.csv" > "$W/result.mfu"
  return $rc
}

stage_bench_loss() {
  local args
  if (( DRY )); then
    args=(--device cpu --shapes "4,32,64,float32" --repeats 2 --warmup 1 --tag dryrun)
  else
    args=(--device cuda --shapes "16,512,2048,bfloat16;64,512,4096,bfloat16;256,256,8192,bfloat16;1024,64,4096,float16"
          --repeats 20 --warmup 3 --tag cuda)
  fi
  "$PY" benchmarks/bench_loss.py "${args[@]}" --no-compile --out "$W/bench" >> "$R/bench.log" 2>&1
  local rc=$? tag=${args[-1]}
  [ -f "$W/bench/bench_loss_$tag.md" ] || return 1
  cat "$W/bench/bench_loss_$tag.md" >> "$R/bench.md"; echo >> "$R/bench.md"
  { echo "# bench_loss_$tag.csv"; cat "$W/bench/bench_loss_$tag.csv"; echo; } >> "$R/bench.csv"
  # the largest shape's rmfast backends against the floor
  "$PY" -c "
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
last = (rows[-1]['pairs'], rows[-1]['seq_len'], rows[-1]['hidden'], rows[-1]['dtype'])
mine = [r for r in rows if (r['pairs'], r['seq_len'], r['hidden'], r['dtype']) == last]
print('x'.join(last[:3]), last[3] + ':', ', '.join(f\"{r['contender']} {float(r['median_ms']):.3f} ms\" for r in mine))
" "$W/bench/bench_loss_$tag.csv" > "$W/result.bench_loss"
  return $rc
}

export -f stage_env stage_build stage_tests stage_smoke stage_bench_train stage_mfu stage_bench_loss
if [ -z "$DATA" ]; then
  echo "no HH-RLHF sample: run benchmarks/carry_wheels.sh (it copies it to .whl/data) or set RMFAST_HH_SAMPLE" >&2
fi
# caps: what each stage may take at most (all of them together are more than the budget: later stages get
# what earlier ones leave)
(( DRY )) || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}   # where stage env installs the wheels
cap() { (( DRY )) && echo "$2" || echo "$1"; }   # cap GPU DRY
run_stage env 60 stage_env
run_stage build 180 stage_build
run_stage tests "$(cap 90 60)" stage_tests
run_stage smoke "$(cap 90 180)" stage_smoke
run_stage bench_train "$(cap 130 240)" stage_bench_train
run_stage mfu "$(cap 130 120)" stage_mfu
run_stage bench_loss 60 stage_bench_loss
echo "" >> "$R/summary.md"
echo "total $SECONDS s" >> "$R/summary.md"
[ -n "${GPU_CHECK_KEEP:-}" ] && echo "work folder kept: $W" >> "$R/summary.md" || rm -rf "$W"   # models, runs
cat "$R/summary.md"
! grep -qE "\| (FAILED|TIMEOUT|SKIPPED)" "$R/summary.md"
exit $?
}
