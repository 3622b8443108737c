# bmkernels developer tasks. `make setup` once, then `make test`, `make bench`, `make lint`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1

.PHONY: setup test test-fast test-all fuzz test-asan bench bench-quick bench-full bench-pytest lint format info clean distclean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==$(TORCH_VERSION) numpy pytest pytest-benchmark hypothesis ninja pybind11 matplotlib
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

# The property-based fuzz tests with the long hypothesis profile (about 10 minutes on 2 cores).
fuzz:
	BMK_FUZZ_PROFILE=long $(BIN)/python -m pytest tests/ops/test_fuzz.py tests/triton/test_fuzz_triton.py -q $(PYTEST_ARGS)

# The CPU op tests on the kernels built with ASan + UBSan (setup.py's BMK_SANITIZE), in a copy of the
# tree (build/asan-tree) so that the normal build stays; twice: the best ISA, then scalar (ASan does
# not see AVX-512 masked loads). python is not instrumented: libasan is preloaded, then libstdc++
# (else the first C++ exception aborts). About an hour on 2 cores, the build included.
ASAN_TREE  ?= build/asan-tree
ASAN_TESTS ?= tests/ops
ASAN_ENV = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
test-asan:
	mkdir -p $(ASAN_TREE)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(ASAN_TREE)
	cd $(ASAN_TREE) && BMK_SANITIZE=address,undefined BMK_SKIP_CUDA=1 MAX_JOBS=$${MAX_JOBS:-1} \
		$(abspath $(BIN))/python setup.py build_ext --inplace > sanitize-build.log 2>&1 \
		|| { tail -n 40 sanitize-build.log; exit 1; }
	cd $(ASAN_TREE) && $(ASAN_ENV) $(abspath $(BIN))/python -m pytest $(ASAN_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)
	cd $(ASAN_TREE) && $(ASAN_ENV) BMK_TEST_CPU_ISA=scalar $(abspath $(BIN))/python -m pytest $(ASAN_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

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
