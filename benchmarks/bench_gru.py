"""pytest-benchmark suite for GRU: the cases of bmkernels.bench (bmkernels/bench/gru.py), one benchmark
per (case, contender), grouped by case.

    python -m pytest benchmarks/bench_gru.py --benchmark-only
    BMK_BENCH_PRESET=default python -m pytest benchmarks/bench_gru.py --benchmark-only
    python -m pytest benchmarks/bench_gru.py --benchmark-only -k cell

Default parametrization: the 'small' preset (the default preset without the (64,64,512,512) layer). The
ratio of record is `bmkernels bench --op gru`, which interleaves the contenders; see benchmarks/conftest.py.
"""

from benchmarks.conftest import run_benchmark

BMK_OP = "gru"  # benchmarks/conftest.py parametrizes (case, contender) with this op's cases


def test_gru(benchmark, bmk_record, case, contender):
    run_benchmark(benchmark, bmk_record, case, contender, "benchmarks/bench_gru.py")
