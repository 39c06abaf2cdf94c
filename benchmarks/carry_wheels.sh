#!/usr/bin/env bash
# Fill the carry folder (.whl/, git-ignored) for the lent GPU machine: Python 3.12 x86-64 wheels of exactly
# what that machine lacks for rmfast, and the HH-RLHF sample that benchmarks/gpu_check.sh trains on (the
# ../shared beside the checkout does not travel). Run here, where PyPI is reachable; the device call then
# names .whl in `carry`, and gpu_check.sh installs it offline:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#
# What the GPU machine has (its image's package list, .library/device/KINDS.md) and what it lacks:
#   has:   torch 2.11 (cu130), triton 3.6, transformers 5.17, tokenizers, accelerate 1.15, peft, safetensors,
#          huggingface-hub 1.33, numpy, pyarrow, pandas, pyyaml, tqdm, filelock, fsspec, xxhash, packaging,
#          psutil, ninja, einops, msgpack, py-cpuinfo, jinja2, tensorboard, pytest (+ timeout, xdist)
#   lacks: deepspeed and, of its run-time needs (Requires-Dist: einops hjson msgpack ninja numpy packaging
#          psutil py-cpuinfo pydantic>=2 torch tqdm), hjson and pydantic
#          -> pydantic needs pydantic-core (cp312, compiled), annotated-types, typing-inspection and
#             typing-extensions>=4.16 (carried: the image's version is unknown and a newer one is compatible)
#          datasets (rmfast reads `save_to_disk` folders and hub names through it; Requires-Dist: filelock numpy
#          pyarrow pandas tqdm xxhash fsspec huggingface-hub packaging pyyaml dill multiprocess) -> dill,
#          multiprocess (its py312 wheel)
#          trl (optional: only examples/trl_reward.py and its test use it; Requires-Dist all present there)
# DeepSpeed publishes only an sdist, so its wheel is BUILT here: DS_BUILD_OPS=0 (no ops compiled; rmfast needs
# none: torch's fused AdamW, and ops DeepSpeed wants are JIT-built there with ninja + nvcc) gives a
# py3-none-any wheel.
#
# Versions: those of this project's .venv (pinned below). Usage:
#   bash benchmarks/carry_wheels.sh [--no-trl] [--check]     # --check: also install offline into a scratch
#                                                            # Python 3.12 target and import-check if possible
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${CARRY_DIR:-.whl}
WITH_TRL=1
CHECK=0
for a in "$@"; do
  case $a in
    --no-trl) WITH_TRL=0 ;;
    --check) CHECK=1 ;;
    *) echo "usage: $0 [--no-trl] [--check]" >&2; exit 2 ;;
  esac
done

DEEPSPEED=deepspeed==0.19.8
WHEELS=(
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
)
(( WITH_TRL )) && WHEELS+=(trl==1.16.0)
DATA=${RMFAST_HH_SAMPLE:-../shared/data/hh-rlhf-harmless-sample.jsonl.gz}

mkdir -p "$DEST/data"
rm -f "$DEST"/*.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "== wheels for CPython 3.12, manylinux x86-64: ${WHEELS[*]}"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${WHEELS[@]}"

echo "== $DEEPSPEED: building a py3-none-any wheel from its sdist (DS_BUILD_OPS=0)"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$build" "$DEEPSPEED"
cp "$build"/deepspeed-*-py3-none-any.whl "$DEST/"

echo "== data: $DATA"
cp "$DATA" "$DEST/data/"
[ -f "$(dirname "$DATA")/HH-RLHF-LICENSE" ] && cp "$(dirname "$DATA")/HH-RLHF-LICENSE" "$DEST/data/"

# one version of each: two would stop the offline install
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "more than one wheel of: $dups" >&2; exit 1; }

ls -l "$DEST"/*.whl "$DEST"/data/*
bytes=$(du -sb "$DEST" | cut -f1)
echo "carry folder $DEST: $(ls "$DEST"/*.whl | wc -l) wheels + data, $((bytes / 1024)) KiB ($(awk "BEGIN{printf \"%.1f\", $bytes/1048576}") MiB) of 64 MiB"
(( bytes < 60 * 1024 * 1024 )) || { echo "carry folder over 60 MiB: the repo must travel too (64 MiB in all)" >&2; exit 1; }

if (( CHECK )); then
  scratch=$(mktemp -d)
  echo "== offline install into a Python 3.12 target ($scratch)"
  # the same command gpu_check.sh runs there, plus the target interpreter named for pip's tag checks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$scratch" \
    --python-version 3.12 --implementation cp --only-binary=:all: "${PLATFORMS[@]}" "$DEST"/*.whl
  ls "$scratch" | grep -v dist-info | tr '\n' ' '; echo
  # a real CPython 3.12 (a pyenv shim named python3.12 may exist without one behind it)
  py312=""
  for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      py312=$(command -v "$c"); break
    fi
  done
  if [ -n "$py312" ]; then
    # what imports without torch / numpy / pyarrow (which the GPU machine has and this 3.12 may lack):
    # the compiled pydantic-core (cp312) through pydantic, and the pure-Python ones
    PYTHONPATH=$scratch "$py312" -c "
import sys, hjson, pydantic, pydantic_core, annotated_types, typing_inspection, typing_extensions, dill, multiprocess
class M(pydantic.BaseModel):
    x: int
assert M(x='3').x == 3
print('imports ok on', sys.executable, sys.version.split()[0], '- pydantic', pydantic.VERSION, 'core', pydantic_core.__version__)"
  else
    echo "no python3.12 here: import check of the compiled wheels only on the GPU machine (gpu_check.sh's env stage)"
    # the pure-Python ones can still be imported by this interpreter
    PYTHONPATH=$scratch $PY -c "import hjson, annotated_types, typing_inspection, dill; print('pure-Python wheels import on', __import__('sys').version.split()[0])"
  fi
  rm -rf "$scratch"
fi
