# bmkernels developer tasks. `make setup` once, then `make test`, `make bench`, `make lint`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1

.PHONY: setup test bench bench-quick bench-full bench-pytest lint info clean distclean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==$(TORCH_VERSION) numpy pytest pytest-benchmark ninja pybind11 ruff matplotlib
	$(BIN)/pip install torchvision==$(TORCHVISION_VERSION) scikit-learn
	$(BIN)/pip install --no-build-isolation -e .

test:
	$(BIN)/python -m pytest tests -q

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

lint:
	$(BIN)/ruff check .

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
