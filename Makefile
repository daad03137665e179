# Every target does its own set-up: `make test` and `make demo` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip's notes about this machine's local index folders are noise (pipefail keeps pip's exit code)
QUIET_PIP := 2>&1 | sed -e '/is ignored: it is neither a file nor a directory/d'

.PHONY: venv test check-sync nbtest pytest demo edit clean-venv

# torch is installed first and pinned, so pip takes the local CPU wheel and never a CUDA build.
$(BIN)/.installed: settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(QUIET_PIP)
	$(BIN)/python -m pip install -q torch==2.13.0 $(QUIET_PIP)
	$(BIN)/python -m pip install -q -e ".[dev]" $(QUIET_PIP)
	touch $@

venv: $(BIN)/.installed

check-sync: venv
	$(BIN)/python tools/check_sync.py

# two notebook workers, one thread each (about 2x faster than threads on 2 cores)
nbtest: venv
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2

# two pytest workers, one thread each, a test file per worker (its module fixtures are built once):
# 3.6 min against 6-9 min in one process with two threads, on 2 cores
pytest: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

# The whole suite, exactly what CI runs (.ci/run calls this).
test: venv
	$(MAKE) --no-print-directory check-sync
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory pytest

# The main job on the bundled sample, offline: an edit with tiny random models (a smoke run: the
# edited face pixels are noise). With real weights, drop --tiny and add --model/--identity-model/--edit-model.
demo: venv
	$(BIN)/ipfacediff edit data/sample.mp4 --prompt "add glasses" --tiny --out out.mp4 --side-by-side out-side-by-side.mp4 --overwrite

clean-venv:
	rm -rf $(VENV)
