"""pytest-benchmark suite for attention: the cases of bmkernels.bench, one benchmark per
(case, contender), grouped by case.

    python -m pytest benchmarks/bench_attention.py --benchmark-only
    BMK_BENCH_PRESET=default python -m pytest benchmarks/bench_attention.py --benchmark-only
    python -m pytest benchmarks/bench_attention.py --benchmark-only --bmk-preset full -k sdpa

Default parametrization: the 'small' preset (the default preset's L=512 cases). Each benchmark
warms up, then runs at least 5 rounds (more for fast calls, within about 2 s). The ratio of record
is `bmkernels bench`, which interleaves the contenders; see benchmarks/conftest.py.
"""

import math
import time

import pytest
import torch

from bmkernels import bench

BMK_OP = "attention"  # benchmarks/conftest.py parametrizes (case, contender) with this op's cases
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S, MIN_ROUND_S = 5, 50, 2.0, 0.005

_inputs = {"name": None, "inputs": None}  # the inputs of the case being run, shared by its contenders


def inputs_for(case):
    if _inputs["name"] != case.name:
        _inputs.update(name=None, inputs=None)
        _inputs.update(name=case.name, inputs=case.make_inputs())
    return _inputs["inputs"]


def test_attention(benchmark, bmk_record, case, contender):
    if contender in case.skipped:
        pytest.skip(case.skipped[contender])
    if contender == bench.BMK:
        from bmkernels import _extension

        _extension.require("benchmarks/bench_attention.py")
    inp = inputs_for(case)
    fn = case.contenders[contender]

    def target():
        with torch.set_grad_enabled(case.backward):
            fn(inp)

    t0 = time.perf_counter()
    target()  # first warm-up call, also sizes the run
    one = time.perf_counter() - t0
    iterations = max(1, math.ceil(MIN_ROUND_S / max(one, 1e-9)))
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, BUDGET_S // max(one * iterations, 1e-9))))

    benchmark.group = f"{case.op} {case.name}"
    benchmark.extra_info.update(case=case.name, contender=contender, flops=case.flops, **case.params)
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=0 if one > 1.0 else 1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median  # per call
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["gflops"] = case.flops / median / 1e9
        bmk_record(case, contender, median)
    if case.backward and contender in case.forward:
        saved = bench.saved_activation_bytes(case.forward[contender], inp)
        benchmark.extra_info["saved_activation_bytes"] = saved
