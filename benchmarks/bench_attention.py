"""pytest-benchmark suite for attention: the cases of bmkernels.bench, one benchmark per
(case, contender), grouped by case.

    python -m pytest benchmarks/bench_attention.py --benchmark-only
    BMK_BENCH_PRESET=default python -m pytest benchmarks/bench_attention.py --benchmark-only
    python -m pytest benchmarks/bench_attention.py --benchmark-only --bmk-preset full -k sdpa

Default parametrization: the 'small' preset (the default preset's L=512 cases). Each benchmark
warms up, then runs at least 5 rounds (more for fast calls, within about 2 s). The ratio of record
is `bmkernels bench`, which interleaves the contenders; see benchmarks/conftest.py.
"""

from benchmarks.conftest import run_benchmark

BMK_OP = "attention"  # benchmarks/conftest.py parametrizes (case, contender) with this op's cases


def test_attention(benchmark, bmk_record, case, contender):
    run_benchmark(benchmark, bmk_record, case, contender, "benchmarks/bench_attention.py")
