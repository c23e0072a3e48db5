# Every target sets itself up: `make test` on a fresh clone creates .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch that CI tests; `make setup TORCH=torch` takes the newest release instead.
TORCH ?= torch==2.13.0

.PHONY: setup test test-unit test-all demo bench lint clean gpu-wheels gpu-check docs

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

# one pytest worker per core (xdist), each test file on one worker so that its module fixtures are built once;
# `pytest tests/FILE.py` alone runs serially, `-m "not slow and not integration"` skips the process launches
PYTEST_PARALLEL ?= -n auto --dist loadfile

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# the unit tests alone: no process launched, nothing slow
test-unit: setup
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow and not integration"

# the slow suite also runs what `convert` writes in llama.cpp: the llamacpp extra, compiled once per venv
$(VENV)/.installed-llamacpp: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e ".[dev,llamacpp]"
	touch $@

test-all: setup $(VENV)/.installed-llamacpp
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "slow or not slow"

demo: $(VENV)/.installed
	$(BIN)/python -m uptrain_gqa.demo

bench: setup
	$(BIN)/python -m benchmarks.convert

lint: setup
	$(BIN)/ruff check uptrain_gqa tests scripts benchmarks experiments
	$(BIN)/ruff format --check uptrain_gqa tests scripts benchmarks experiments
	$(BIN)/lint-imports

# The prepared GPU check (docs/benchmarks.md, "On a GPU"). A bare GPU machine has python3 with torch and transformers but
# lacks datasets, dill and multiprocess, and reaches no registry: `make gpu-wheels` puts them here, as wheels
# for its Python 3.12 on x86-64, with uptrain's own wheel, into .gpu-wheels/ (ignored: carry it). The pins are
# the versions this project runs with; after changing one, empty the folder (two versions stop the install).
GPU_WHEELS := datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
GPU_PIP := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m pip

gpu-wheels:
	$(GPU_PIP) wheel --quiet --no-deps --wheel-dir .gpu-wheels .
	$(GPU_PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--dest .gpu-wheels $(GPU_WHEELS)
	@ls .gpu-wheels && du -sh .gpu-wheels

# It sets itself up as every target does (.venv first, then its python; without a GPU, a dry run of every part
# with tiny shapes), except on a bare GPU machine: no .venv and a python3 that has torch, which it runs as it is
# (benchmarks/gpu_check.sh), since that machine reaches no registry. Tables: $$OUT or gpu-check-out/.
GPU_CHECK_BARE = $(if $(wildcard $(BIN)/python),,$(shell $(PYTHON) -c \
	"import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1 && echo bare))

gpu-check: $(if $(GPU_CHECK_BARE),,$(VENV)/.installed)
	VENV=$(VENV) PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

docs: setup
	$(BIN)/mkdocs build --strict --quiet
