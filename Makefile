# bmkernels developer tasks. `make setup` once, then `make test`, `make bench`, `make lint`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1

.PHONY: setup test test-fast test-all bench bench-quick bench-full bench-pytest lint format info clean distclean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==$(TORCH_VERSION) numpy pytest pytest-benchmark ninja pybind11 matplotlib
	$(BIN)/pip install torchvision==$(TORCHVISION_VERSION) scikit-learn
	$(BIN)/pip install transformers==5.23.0 timm==1.0.31 expecttest ruff==0.17.6 clang-format==21.1.8
	$(BIN)/pip install --no-build-isolation -e .

# What CI runs (the README's test command): everything but the tests marked exhaustive.
test:
	$(BIN)/python -m pytest tests -q

# The edit loop: about a minute on 2 cores.
test-fast:
	$(BIN)/python -m pytest tests -q -m "not slow"

# Every test, the exhaustive ones (beyond CI's time budget) included.
test-all:
	$(BIN)/python -m pytest tests -q --exhaustive

# The default preset: a few minutes on 2 cores. `make bench BENCH_ARGS="--json bench_out/attn.json"`.
bench:
	$(BIN)/bmkernels bench $(BENCH_ARGS)

bench-quick:
	$(BIN)/bmkernels bench --quick $(BENCH_ARGS)

bench-full:
	$(BIN)/bmkernels bench --full $(BENCH_ARGS)

# pytest-benchmark suites; BMK_BENCH_PRESET=quick|small|default|full (default: small).
bench-pytest:
	$(BIN)/python -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

# What CI enforces: `make format` rewrites in place, `make lint` only checks.
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' | xargs $(BIN)/clang-format --dry-run -Werror

format:
	$(BIN)/ruff format .
	git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' | xargs $(BIN)/clang-format -i

info:
	$(BIN)/bmkernels info

# Removes build outputs, including the in-place compiled extension (bmkernels/_C*.so):
# run `make setup` (or `pip install --no-build-isolation -e .`) again afterwards.
clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .ruff_cache bench_out
	rm -f bmkernels/_C*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
