#!/usr/bin/env bash
# The GPU check, for the lent GPU machine (one H100 / H200, no network, python3 = 3.12 with torch, triton and
# transformers, but no deepspeed, datasets, pydantic, hjson; see benchmarks/carry_wheels.sh, which fills the
# carry folder .whl/ with their wheels and the HH-RLHF sample). Stages, most important numbers first, each
# under its own cap (seconds on the GPU, in brackets), cut to what is left of one overall budget:
#   env         [15] GPU, driver, versions, setuptools (the build needs >= 77); installs the carried wheels
#   build       [90] the extension for the visible GPU only (TORCH_CUDA_ARCH_LIST from nvidia-smi), pip -e
#   bench_loss  [45] the fused loss against its floor (bytes it must move / measured copy bandwidth) and
#                    eager torch: CUDA-event times, forward and forward+backward, up to 16,384 x 8,192 bf16
#   mfu         [75] benchmarks/bench_mfu.py: a 1B Llama-shaped reward model, prefix_shared + varlen, MFU
#   tests       [60] the CUDA tests against the float64 reference (pytest -k cuda -rA --durations=10)
#   smoke       [45] 20 bf16 steps of a tiny Llama through `python3 -m rmfast.cli`, for each of padded,
#                    packed+varlen, prefix_shared+varlen, prefix_shared+flex (in parallel): loss falls?
#   bench_train [50] end to end on the HH sample, a 134M-parameter Llama, 32 pairs per step: DeepSpeed-Chat-
#                    style, TRL-style, rmfast padded / packed / prefix_shared and the real Trainer (its
#                    DeepSpeed host syncs per step counted), in one process, tokenizer and data built once
# The caps add up to 380 s; with the machine's start and the transfers that fits the device tool's
# timeout_s 480 (GPU_CHECK_BUDGET, default 420, is the script's own deadline over all stages).
# Every stage writes its results to the return folder the moment it ends (smoke: as each run ends), so a
# run cut off still returns each finished stage.
# Results (8 files at most, the device tool's limit) go to $OUT when set, else to DIR (default
# benchmarks/results/gpu): summary.md (one line per stage: status, seconds, result), env.txt, build.log,
# tests.log, train.log, bench.md (the benchmarks' tables), bench.log (their output), bench.csv.
#
# GPU_CHECK_STAGES=mfu,smoke (a comma list) runs only those stages, for a rerun on the warm machine: env
# and build run too only when they are not done yet (the carried wheels not in /tmp/site, the extension
# not built with CUDA kernels). Compiled Triton / Inductor kernels are kept in /tmp between calls.
#
# --dry-run runs every stage on CPU with tiny sizes (no wheels, no build: CI built the extension; segments
# attention for varlen / flex, fp32, 2-3 steps, TRITON_INTERPRET=1), so that CI keeps the script working
# (tests/test_gpu_check.py). Budget there: GPU_CHECK_BUDGET, default 600; the caps are CPU ones.
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
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) DIR=$a ;;
  esac
done
ALL="env build bench_loss mfu tests smoke bench_train"
WANT=" ${GPU_CHECK_STAGES:-$ALL} "
WANT=${WANT//,/ }
for s in $WANT; do
  [[ " $ALL " == *" $s "* ]] || { echo "GPU_CHECK_STAGES: unknown stage $s (stages: ${ALL// /,})" >&2; exit 2; }
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
  BUDGET=${GPU_CHECK_BUDGET:-420}
  # compiled kernels survive between calls on a warm machine: a rerun does not compile them again
  export TRITON_CACHE_DIR=/tmp/rmfast-cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/rmfast-cache/inductor
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

printf '# gpu_check %s\n\n%s, budget %s s, stages:%s%s\n\n| stage | status | seconds | result |\n|---|---|---|---|\n' \
  "$(git rev-parse --short HEAD 2>/dev/null)" "$(date -u +%FT%TZ)" "$BUDGET" "$WANT" \
  "$( ((DRY)) && echo ', DRY RUN (CPU, tiny sizes)')" > "$R/summary.md"
for f in env.txt build.log tests.log train.log bench.md bench.log bench.csv; do : > "$R/$f"; done

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

# What a rerun on the warm machine may skip: the carried wheels already installed, the extension built.
env_done() {
  (( DRY )) && return 0
  ! ls .whl/*.whl >/dev/null 2>&1 || [ -d /tmp/site/deepspeed ]
}
build_done() {
  (( DRY )) && return 0
  (cd /tmp && "$PY" -c "
import sys
from rmfast import _extension
source, build, _ = _extension.info()
sys.exit(0 if source and build.get('with_cuda') else 1)") >/dev/null 2>&1
}
export -f env_done build_done

stage_env() {
  {
    date -u
    echo "dry run: $DRY; python: $PY; data: ${DATA:-MISSING}; stages:$WANT"
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
    "$PY" - <<'PYEOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
names = ["torch", "triton", "transformers", "tokenizers", "accelerate", "peft", "deepspeed", "datasets", "pydantic",
         "pydantic_core", "hjson", "dill", "multiprocess", "trl", "pyarrow", "pandas", "fsspec", "huggingface_hub",
         "numpy", "typing_extensions", "einops", "msgpack", "cpuinfo", "ninja", "xxhash", "flash_attn", "setuptools",
         "pytest", "xdist", "pytest_timeout"]
dists = {"cpuinfo": "py-cpuinfo", "xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout"}
bad = []
for n in names:
    try:
        m = importlib.import_module(n)
        v = getattr(m, "__version__", None) or md.version(dists.get(n, n.replace("_", "-")))
        print(f"{n:18} {v}  ({getattr(m, '__file__', '') or ''})")
    except Exception as exc:  # noqa: BLE001
        print(f"{n:18} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
        if n in ("torch", "transformers", "deepspeed", "pydantic", "hjson", "datasets", "setuptools"):
            bad.append(n)
# pyproject's `license = "..."` (an SPDX string) needs setuptools >= 77 to build the extension
import setuptools
major = int(setuptools.__version__.split(".")[0])
print(f"build needs setuptools >= 77: {setuptools.__version__} {'ok' if major >= 77 else 'TOO OLD'}")
if major < 77:
    bad.append("setuptools<77")
import torch
print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(1 if bad else 0)
PYEOF
  } > "$R/env.txt" 2>&1
  local ok=$?
  cat "$R/env.txt"
  local gpu; gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  echo "${gpu:-no GPU}; $(grep -E '^(torch|triton|transformers|deepspeed|setuptools) +[0-9]' "$R/env.txt" \
    | awk '{print $1, $2}' | tr '\n' ' ')" > "$W/result.env"
  return $ok
}

stage_build() {
  if (( DRY )); then
    echo "dry run: no build (the extension was built by make / CI)" > "$R/build.log"
  else
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    [ -z "$cap" ] && cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    echo "TORCH_CUDA_ARCH_LIST=$cap; setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)')" \
      > "$R/build.log"
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

stage_bench_loss() {
  local args
  if (( DRY )); then
    args=(--device cpu --shapes "4,32,64,float32;2,16,128,bfloat16" --iters 3 --budget-ms 50 --copy-mib 16 --tag dryrun)
  else
    # 16,384 rows of 2,048 / 4,096 / 8,192 (D of 1B / 7B / 70B models), a 65,536-row one, fp32 and fp16
    args=(--device cuda --shapes "16,512,2048,bfloat16;16,512,4096,bfloat16;16,512,8192,bfloat16;64,512,4096,bfloat16;16,512,4096,float32;256,64,4096,float16"
          --iters 100 --budget-ms 200 --tag cuda)
  fi
  "$PY" benchmarks/bench_loss.py "${args[@]}" --no-compile --out "$W/bench" >> "$R/bench.log" 2>&1
  local rc=$? tag=${args[-1]}
  [ -f "$W/bench/bench_loss_$tag.md" ] || return 1
  cat "$W/bench/bench_loss_$tag.md" >> "$R/bench.md"; echo >> "$R/bench.md"
  { echo "# bench_loss_$tag.csv"; cat "$W/bench/bench_loss_$tag.csv"; echo; } >> "$R/bench.csv"
  "$PY" benchmarks/bench_loss.py --headline "$W/bench/bench_loss_$tag.csv" > "$W/result.bench_loss"
  return $rc
}

stage_mfu() {
  local args=()
  (( DRY )) && args=(--tiny --device cpu --tag dryrun) || args=(--steps 5 --warmup 1 --tag cuda)
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

stage_tests() {
  local extra=()
  if (( ! DRY )); then
    "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
  fi
  # torch 2.11's compiled FlexAttention refuses head_dim < 16: the flex gradient tests of test_layouts /
  # test_groups (the tiny Llama has head_dim 8) are replaced by test_gpu_path's, at head_dim 16
  # the objectives' kernels (Davidson, Plackett–Luce, the attribute head's regression) are in test_objectives /
  # test_attributes; a file that cannot be collected there does not stop the others
  "$PY" -m pytest -q -p no:cacheprovider -rA --durations=10 --continue-on-collection-errors "${extra[@]}" -k cuda \
    tests/test_pairwise_loss.py tests/test_objectives.py tests/test_attributes.py tests/test_backends.py \
    tests/test_layouts.py tests/test_groups.py tests/test_gpu_path.py \
    --deselect tests/test_layouts.py::test_flex_attention_gradients_equal_padded_on_cuda \
    --deselect tests/test_groups.py::test_flex_attention_group_gradients_equal_padded_on_cuda > "$R/tests.log" 2>&1
  local rc=$?
  tail -1 "$R/tests.log" | tr -d '=' | sed 's/^ *//' > "$W/result.tests"
  grep -qE "passed|skipped" "$R/tests.log" || return 1
  return $rc
}

# smoke_result DIR RUN: one line on a finished smoke run (loss, eval loss and accuracy, tok/s); fails when
# the run is incomplete or, on the GPU, when the eval loss did not fall
smoke_result() {
  "$PY" - "$1" "$2" <<'PYEOF'
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
PYEOF
}
export -f smoke_result

stage_smoke() {
  local demo=$W/demo steps=20 dtype=bf16 n=3000 runs=(padded:auto packed:varlen prefix_shared:varlen prefix_shared:flex)
  # dry run: CPU maps varlen and flex to segments (varlen is refused on CPU, flex trains only on CUDA), so
  # prefix_shared+flex would repeat prefix_shared+varlen; one thread each, the runs share two cores
  (( DRY )) && { steps=3; dtype=fp32; n=200; runs=(padded:auto packed:varlen prefix_shared:varlen); }
  "$PY" -c "from rmfast.cli import demo_setup; demo_setup('$demo', pairs=$n)" >> "$R/train.log" 2>&1 || return 1
  if (( DRY )); then head -64 "$demo/demo-data/eval.jsonl" > "$demo/eval-small.jsonl"; else cp "$demo/demo-data/eval.jsonl" "$demo/eval-small.jsonl"; fi
  : > "$W/result.smoke"
  local -A pid_run=()
  local run layout attn name
  for run in "${runs[@]}"; do
    layout=${run%%:*}; attn=${run##*:}; name=$layout-$attn
    (( DRY )) && [ "$attn" != auto ] && attn=segments   # varlen is refused on CPU, flex trains only on CUDA
    local args=(--model.name_or_path "$demo/demo-model" --data.train "$demo/demo-data/train.jsonl"
      --data.eval "$demo/eval-small.jsonl" --data.max_length 256 --data.cache_dir "$W/cache-$name"
      --train.output_dir "$W/smoke-$name" --train.layout "$layout" --train.attention "$attn"
      --model.dtype "$dtype" --train.max_steps "$steps" --train.pairs_per_batch 32 --train.lr 2e-3
      --train.warmup_ratio 0.05 --train.weight_decay 0 --train.use_margin false --train.log_every 1
      --train.eval_every 0 --train.save_every 0 --train.export false --train.tensorboard false)
    # in parallel: tiny models, mostly start-up and compile time; the flex run logs its (re)compilations
    if (( DRY )); then
      OMP_NUM_THREADS=1 "$PY" -m rmfast.cli "${args[@]}" > "$W/smoke-$name.log" 2>&1 &
    elif [ "$attn" = flex ]; then
      TORCH_LOGS=recompiles "$PY" -m rmfast.cli "${args[@]}" > "$W/smoke-$name.log" 2>&1 &
    else
      "$PY" -m rmfast.cli "${args[@]}" > "$W/smoke-$name.log" 2>&1 &
    fi
    pid_run[$!]=$run
  done
  # each run's log and result line go to the return folder as soon as that run ends, not after all of them
  local fails=0 pid rc line
  while (( ${#pid_run[@]} )); do
    for pid in "${!pid_run[@]}"; do
      kill -0 "$pid" 2>/dev/null && continue
      wait "$pid"; rc=$?
      run=${pid_run[$pid]}; unset "pid_run[$pid]"
      name=${run%%:*}-${run##*:}
      line=$(smoke_result "$W/smoke-$name" "$run") || fails=$((fails + 1))
      (( rc )) && { fails=$((fails + 1)); line="$line (exit $rc)"; }
      [ "${run##*:}" = flex ] && (( ! DRY )) \
        && line="$line flex recompilations: $(grep -c 'Recompiling function' "$W/smoke-$name.log");"
      echo "$line" >> "$W/result.smoke"
      { echo "===== $run ($dtype, $steps steps)"; cat "$W/smoke-$name.log"; echo "$line"; } >> "$R/train.log"
    done
    (( ${#pid_run[@]} )) && sleep 1
  done
  return $fails
}

stage_bench_train() {
  local args tag
  if (( DRY )); then
    args=(--device cpu --hidden 64 --layers 2 --vocab 500 --pairs 4 --steps 2 --warmup 1) tag=dryrun
  else
    # 18 layers of 768: 127M parameters outside the embeddings, 134M in all with the 8,000-token BPE; 32 pairs
    # per step (64 sequences), enough not to be bound by kernel launches
    args=(--device cuda --dtype bf16 --hidden 768 --layers 18 --vocab 8000 --pairs 32 --steps 6 --warmup 2) tag=cuda
  fi
  # one process on the GPU (the contenders one after another, the tokenizer and data built once); a
  # contender that fails costs only its own line
  "$PY" benchmarks/bench_train.py "${args[@]}" --tag "$tag" --data "$DATA" --out "$W/bench" >> "$R/bench.log" 2>&1
  local rc=$?
  [ -f "$W/bench/bench_train_$tag.md" ] || { echo "bench_train FAILED (bench.log)" > "$W/result.bench_train"; return 1; }
  cat "$W/bench/bench_train_$tag.md" >> "$R/bench.md"; echo >> "$R/bench.md"
  { echo "# bench_train_$tag.csv"; cat "$W/bench/bench_train_$tag.csv"; echo; } >> "$R/bench.csv"
  grep -E "^\| (rmfast-prefix|rmfast-trainer|dschat|trl) " "$W/bench/bench_train_$tag.md" \
    | awk -F'|' '{printf "%s%s pairs/s;", $2, $3}' > "$W/result.bench_train"
  grep -m1 -o "[0-9]* host syncs per step" "$W/bench/bench_train_$tag.md" >> "$W/result.bench_train"
  return $rc
}

export -f stage_env stage_build stage_tests stage_smoke stage_bench_train stage_mfu stage_bench_loss
if [ -z "$DATA" ]; then
  echo "no HH-RLHF sample: run benchmarks/carry_wheels.sh (it copies it to .whl/data) or set RMFAST_HH_SAMPLE" >&2
fi
(( DRY )) || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}   # where stage env installs the wheels
cap() { (( DRY )) && echo "$2" || echo "$1"; }   # cap GPU DRY; the GPU caps add up to 380 s
want() { [[ $WANT == *" $1 "* ]]; }
skip() { echo "| $1 | ok (done before: $2) | 0 | |" >> "$R/summary.md"; echo "== $1: done before ($2)"; }
if want env || ! env_done; then run_stage env "$(cap 15 60)" stage_env; else skip env "carried wheels in /tmp/site"; fi
if want build || ! build_done; then run_stage build "$(cap 90 30)" stage_build; else skip build "extension with CUDA"; fi
want bench_loss && run_stage bench_loss "$(cap 45 120)" stage_bench_loss
want mfu && run_stage mfu "$(cap 75 120)" stage_mfu
want tests && run_stage tests "$(cap 60 120)" stage_tests
want smoke && run_stage smoke "$(cap 45 180)" stage_smoke
want bench_train && run_stage bench_train "$(cap 50 240)" stage_bench_train
echo "" >> "$R/summary.md"
echo "total $SECONDS s" >> "$R/summary.md"
[ -n "${GPU_CHECK_KEEP:-}" ] && echo "work folder kept: $W" >> "$R/summary.md" || rm -rf "$W"   # models, runs
cat "$R/summary.md"
! grep -qE "\| (FAILED|TIMEOUT|SKIPPED)" "$R/summary.md"
exit $?
}
