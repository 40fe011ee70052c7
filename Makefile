# Two commands a newcomer needs: `make run` (the whole job on the embedded default) and
# `make test` (the test suite). Both create the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-slow lint bench pretrain-tiny clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python jobs/full.py

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(BIN)/.installed
	$(BIN)/ruff check engine jobs tests benchmarks

bench: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

pretrain-tiny: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python jobs/pretrain_tiny.py

clean:
	rm -rf $(VENV) runs .pytest_cache
