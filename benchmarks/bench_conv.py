"""pytest-benchmark suite for conv: the cases of bmkernels.bench (bmkernels/bench/conv.py), one benchmark
per (case, contender), grouped by case.

    python -m pytest benchmarks/bench_conv.py --benchmark-only
    BMK_BENCH_PRESET=default python -m pytest benchmarks/bench_conv.py --benchmark-only

Default parametrization: the 'small' preset (the deep ResNet-18 layers, forward). The ratio of record
is `bmkernels bench --op conv`, which interleaves the contenders; see benchmarks/conftest.py.
"""

from benchmarks.bench_attention import test_attention as run_benchmark  # op-agnostic body: time one contender

BMK_OP = "conv"  # benchmarks/conftest.py parametrizes (case, contender) with this op's cases


def test_conv(benchmark, bmk_record, case, contender):
    run_benchmark(benchmark, bmk_record, case, contender)
