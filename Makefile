# `make repro`: virtual environment + pinned dependencies + `dvc repro` of the bundled default.
# `make test`: the same plus test dependencies, then the whole test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV)/bin)
# torch is pinned in the same pip call as the rest (an unpinned torch pulls a multi-GB CUDA build); a venv that
# already has a torch (say a CUDA build you installed) keeps it. Override with `make TORCH=...`.
TORCH ?= $(shell $(BIN)/python -c "import torch" >/dev/null 2>&1 || echo torch==2.13.0)
RUN := PATH="$(BIN):$$PATH" DVC_NO_ANALYTICS=1 WANDB_MODE=$${WANDB_MODE:-offline}

.PHONY: repro test test-quick gpu-check bench-deps clean-venv

$(VENV)/.deps: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH) -r requirements.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH) -r requirements.txt -r requirements-test.txt
	touch $@

repro: $(VENV)/.deps
	$(RUN) dvc repro

test: $(VENV)/.test-deps
	$(RUN) python -m pytest -q -n 2 --dist loadfile --durations=15

# the inner loop: everything but the tests marked slow (real DVC runs, torchrun, compilers)
test-quick: $(VENV)/.test-deps
	$(RUN) python -m pytest -q -n 2 --dist loadfile -m "not slow"

# the CUDA path, one command (bench/gpu_check.py): every check on a GPU machine, the CPU subset elsewhere. Given an
# interpreter that already imports torch (a GPU machine's own: `make gpu-check PYTHON=python3`) it runs with it: no
# venv, no pip, nothing fetched. Options: GPU_CHECK_ARGS="--budget 420 --json gpu_check.json"
GPU_CHECK_ARGS ?=
gpu-check:
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "gpu-check: $(PYTHON) imports torch: no venv, nothing installed"; \
		PYTHONPATH=".$${PYTHONPATH:+:$$PYTHONPATH}" DVC_NO_ANALYTICS=1 $(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS); \
	else \
		$(MAKE) --no-print-directory $(VENV)/.deps && $(RUN) python -m bench.gpu_check $(GPU_CHECK_ARGS); \
	fi

# the peers the benchmarks in bench/ compare against (TRL, transformers); `make test` does not need them
bench-deps: $(VENV)/.test-deps bench/requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH) -r requirements.txt -r bench/requirements.txt

clean-venv:
	rm -rf $(VENV)
