# Every target sets itself up: `make test` on a fresh clone creates .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch that CI tests; `make setup TORCH=torch` takes the newest release instead.
TORCH ?= torch==2.13.0

.PHONY: setup test test-all demo bench lint clean

setup: $(VENV)/.installed-dev

# the package alone (what `make demo` needs), then the dev tools on top (tests, lint)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

demo: $(VENV)/.installed
	$(BIN)/python -m uptrain.demo

bench: setup
	$(BIN)/python -m scripts.bench_convert

lint: setup
	$(BIN)/ruff check uptrain tests scripts
	$(BIN)/ruff format --check uptrain tests scripts
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
