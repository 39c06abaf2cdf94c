# Everything runs in a project virtual environment (.venv) that `make setup` creates from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.14.1

.PHONY: setup demo demo-loss test test-fast test-floors lint bench env clean

# Marker files keep `make test` from reinstalling; csrc changes rebuild the extension.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=77" wheel ninja
	$(PIP) install "$(TORCH)"
	touch $@

$(VENV)/.rmfast: $(VENV)/.torch setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*)
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-build-isolation -e ".[train]"
	touch $@

setup: $(VENV)/.rmfast

demo: setup
	$(VENV)/bin/rmfast-train --demo --train.output_dir runs/demo

demo-loss: setup
	$(PY) examples/fused_loss_demo.py

# the whole suite (what CI runs) on two workers, the slowest 25 tests named at the end
test: setup
	$(PY) -m pytest tests -n 2 --durations=25

lint: setup
	$(VENV)/bin/ruff check .

# the unit tier: everything but the tests that train, launch or build (about a minute and a half)
test-fast: setup
	$(PY) -m pytest tests -n 2 -m "not slow"

# the unit tier again with the lowest version pyproject.toml admits of every dependency with a floor (torch
# excepted): the declared floors are tested (tools/floors.py)
test-floors: setup
	$(PY) tools/floors.py .venv-floors $(PY)
	.venv-floors/bin/python -m pytest tests -n 2 -m "not slow" -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/bench_loss.py

env: setup
	$(VENV)/bin/rmfast-env

clean:
	rm -rf $(VENV) .venv-floors build *.egg-info rmfast/_C*.so
