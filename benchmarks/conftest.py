"""pytest-benchmark plumbing shared by the benchmarks/ suites.

Which cases run: `--bmk-preset {quick,small,default,full}` or the BMK_BENCH_PRESET environment
variable (default: small -- the default preset's L=512 cases). The cases themselves come from
bmkernels.bench, the same ones `bmkernels bench` runs.

pytest-benchmark times one contender after another rather than interleaved, so the ratio summary
printed at the end (baseline median / bmkernels median per case) is indicative only; the
interleaved numbers of record come from `bmkernels bench`.
"""

import math
import os
import statistics
import time

import pytest
import torch

from bmkernels import bench

_RESULTS = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("bmkernels")
    group.addoption(
        "--bmk-preset",
        choices=bench.PRESETS,
        default=None,
        help="bmkernels benchmark preset (default: $BMK_BENCH_PRESET or 'small')",
    )


def preset(config):
    name = config.getoption("bmk_preset", None) or os.environ.get("BMK_BENCH_PRESET") or "small"
    if name not in bench.PRESETS:
        raise pytest.UsageError(f"BMK_BENCH_PRESET must be one of {', '.join(bench.PRESETS)}; got {name!r}")
    return name


def case_id(case, contender):
    return f"{case.name.replace('fwd+bwd', 'fwdbwd').replace(' ', '-')}-{contender}"


def pytest_generate_tests(metafunc):
    """Parametrize (case, contender) of a suite with the cases of its BMK_OP in the chosen preset."""
    op = getattr(metafunc.module, "BMK_OP", None)
    if op and {"case", "contender"} <= set(metafunc.fixturenames):
        cases = bench.cases_for([op], preset(metafunc.config))
        params = [(c, n) for c in cases for n in c.contenders]
        metafunc.parametrize(("case", "contender"), params, ids=[case_id(c, n) for c, n in params])


def pytest_configure(config):
    config.stash[_RESULTS] = {}


@pytest.fixture
def bmk_record(request):
    """record(case, contender, median_s): remember a median for the ratio summary."""
    results = request.config.stash[_RESULTS]

    def record(case, contender, median_s):
        entry = results.setdefault((case.op, case.name), {"case": case, "medians": {}})
        entry["medians"][contender] = median_s

    return record


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    tr = terminalreporter
    tr.section("bmkernels ratios (baseline median / bmkernels median; > 1: bmkernels faster)")
    tr.write_line(
        "Not interleaved (pytest-benchmark runs contenders one after another); "
        "`bmkernels bench` gives the interleaved numbers."
    )
    for (op, name), entry in results.items():
        case, med = entry["case"], entry["medians"]
        primary = med.get(case.primary)
        parts = []
        for b in case.baselines:
            if b in case.skipped:
                parts.append(f"vs {b} skipped")
            elif primary and b in med:
                parts.append(f"vs {b} {med[b] / primary:.2f}x")
        gflops = f"{case.flops / primary / 1e9:.1f} GFLOP/s" if primary else "not measured"
        tr.write_line(f"{op} {name}: bmkernels {gflops}; " + ", ".join(parts))


# Shared body of the per-family suites (benchmarks/bench_<family>.py call it from their one test).
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S, MIN_ROUND_S = 5, 50, 2.0, 0.005
_case_inputs = {"name": None, "inputs": None}  # the inputs of the case being run, shared by its contenders


def case_inputs(case):
    if _case_inputs["name"] != case.name:
        _case_inputs.update(name=None, inputs=None)
        _case_inputs.update(name=case.name, inputs=case.make_inputs())
    return _case_inputs["inputs"]


def run_benchmark(benchmark, bmk_record, case, contender, suite):
    """Times one contender of one case: a warm-up call sizes the run, then at least MIN_ROUNDS rounds
    within about BUDGET_S; records the median for the ratio summary and the saved activation memory."""
    if contender in case.skipped:
        pytest.skip(case.skipped[contender])
    if contender == bench.BMK:
        from bmkernels import _extension

        _extension.require(suite)
    inp = case_inputs(case)
    fn = case.contenders[contender]

    def target():
        with torch.set_grad_enabled(case.backward):
            fn(inp)

    t0 = time.perf_counter()
    target()
    one = time.perf_counter() - t0
    iterations = max(1, math.ceil(MIN_ROUND_S / max(one, 1e-9)))
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, BUDGET_S // max(one * iterations, 1e-9))))
    benchmark.group = f"{case.op} {case.name}"
    benchmark.extra_info.update(case=case.name, contender=contender, flops=case.flops, **case.params)
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=0 if one > 1.0 else 1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["gflops"] = case.flops / median / 1e9
        bmk_record(case, contender, median)
    if case.backward and contender in case.forward:
        benchmark.extra_info["saved_activation_bytes"] = bench.saved_activation_bytes(case.forward[contender], inp)


def run_gpu_benchmark(benchmark, run, flops, case, contender, measure, rounds, warmup_rounds):
    """Shared body of the GPU suites (benchmarks/bench_triton_*.py): compile/autotune outside the timing,
    time synchronized calls, then record the triton.testing.do_bench median (`measure`) and TFLOP/s."""
    run(contender)
    torch.cuda.synchronize()

    def target():
        run(contender)
        torch.cuda.synchronize()

    benchmark.group = str(case)
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    ms = statistics.median(measure(run, contender))
    benchmark.extra_info.update(contender=contender, median_ms=ms, tflops=flops / ms / 1e9)
