"""pytest-benchmark plumbing shared by the benchmarks/ suites.

Which cases run: `--bmk-preset {quick,small,default,full}` or the BMK_BENCH_PRESET environment
variable (default: small -- the default preset's L=512 cases). The cases themselves come from
bmkernels.bench, the same ones `bmkernels bench` runs.

pytest-benchmark times one contender after another rather than interleaved, so the ratio summary
printed at the end (baseline median / bmkernels median per case) is indicative only; the
interleaved numbers of record come from `bmkernels bench`.
"""

import os

import pytest

from bmkernels import bench

_RESULTS = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("bmkernels")
    group.addoption("--bmk-preset", choices=bench.PRESETS, default=None,
                    help="bmkernels benchmark preset (default: $BMK_BENCH_PRESET or 'small')")


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
    tr.write_line("Not interleaved (pytest-benchmark runs contenders one after another); "
                  "`bmkernels bench` gives the interleaved numbers.")
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
