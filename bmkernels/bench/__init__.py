"""Benchmark cases and the interleaved timing engine behind `bmkernels bench` and `benchmarks/`.

Protocol (docs/benchmarks.md): every case times bmkernels and its baselines in the same process,
interleaved -- for each repetition every contender runs once, in an order that rotates from one
repetition to the next -- after a warm-up, and reports the median time per contender, GFLOP/s and
ratio = baseline time / bmkernels time (> 1 means bmkernels is faster). Threads: torch's default.

A case is a `Case`: a name, `make_inputs()` (a dict handed to every contender), `contenders`
(name -> callable(inputs); the first is bmkernels), the FLOP count, and whether it is timed as
forward only (under no_grad) or forward+backward. Each op family's cases live in a module of this
package (bmkernels/bench/attention.py, ...) registered in `CASE_MODULES`.

Memory. CPU tensors have no allocator statistics and the process RSS high-water mark is
unreliable (shared allocator caches, other work in the process), so for forward+backward cases
we report *saved activation memory*: the bytes of the distinct tensor storages that autograd keeps
between forward and backward for one call, collected with
torch.autograd.graph.saved_tensors_hooks. It includes saved inputs (q, k, v for every attention
contender) and is what grows with L*L when a contender materialises the score matrix; it is not a
process peak, and transient buffers freed within forward or backward are not in it.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

PRESETS = ("quick", "small", "default", "full")
BMK = "bmkernels"

# Timing knobs per preset: warm-up seconds per contender, measurement budget per case (seconds),
# minimum and maximum repetitions, and the shortest sample (calls are batched up to this).
TIMING = {
    "quick": dict(warmup_s=0.05, budget_s=0.4, min_reps=5, max_reps=30, min_sample_s=0.002),
    "small": dict(warmup_s=0.2, budget_s=2.0, min_reps=5, max_reps=50, min_sample_s=0.005),
    "default": dict(warmup_s=0.2, budget_s=3.0, min_reps=5, max_reps=50, min_sample_s=0.005),
    "full": dict(warmup_s=0.3, budget_s=6.0, min_reps=7, max_reps=100, min_sample_s=0.005),
}


@dataclass
class Case:
    """One benchmark case: the same inputs run through every contender."""

    op: str
    name: str
    make_inputs: Callable[[], dict]
    contenders: dict[str, Callable[[dict], Any]]
    flops: float
    backward: bool = False
    params: dict = field(default_factory=dict)
    # contender name -> why it is not run (kept in the table as "skipped").
    skipped: dict[str, str] = field(default_factory=dict)
    # contender name -> forward callable(inputs) -> output, for the saved-activation-memory probe.
    forward: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    primary: str = BMK
    # bytes a call must read at least (memory-bound cases: GB/s and the share of the DRAM read rate)
    bytes: float = 0.0

    @property
    def baselines(self):
        return [n for n in self.contenders if n != self.primary]


@dataclass
class Result:
    case: Case
    reps: int = 0
    number: int = 1
    times_s: dict[str, list[float]] = field(default_factory=dict)  # per-call seconds, one per rep
    saved_bytes: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def median(self, name):
        t = self.times_s.get(name)
        return statistics.median(t) if t else None

    def gflops(self, name):
        m = self.median(name)
        return self.case.flops / m / 1e9 if m and self.case.flops else None

    def gbps(self, name):
        m = self.median(name)
        return self.case.bytes / m / 1e9 if m and self.case.bytes else None

    def ratio(self, baseline):
        """baseline time / bmkernels time: > 1 means bmkernels is faster."""
        b, p = self.median(baseline), self.median(self.case.primary)
        return b / p if b and p else None

    def best_ratio(self):
        times = [self.median(n) for n in self.case.baselines if self.median(n)]
        p = self.median(self.case.primary)
        return min(times) / p if times and p else None

    def to_dict(self, ceilings=None):
        """The result as JSON data; with ceilings (measure_ceilings()), the primary's share of its ceiling."""
        c = self.case
        contenders = {}
        for n in c.contenders:
            d = {"skipped": c.skipped.get(n)}
            if n in self.times_s:
                d.update(
                    median_ms=self.median(n) * 1e3,
                    min_ms=min(self.times_s[n]) * 1e3,
                    times_ms=[t * 1e3 for t in self.times_s[n]],
                    gflops=self.gflops(n),
                    gbps=self.gbps(n),
                )
            if n in self.saved_bytes:
                d["saved_bytes"] = self.saved_bytes[n]
            contenders[n] = d
        key = ceiling_key(c.op, c.params, c.flops, c.bytes)
        ceiling = None
        if key and ceilings and ceilings.get(key):
            rate = self.gbps(c.primary) if key == "dram_read_gbps" else self.gflops(c.primary)
            ceiling = {"name": key, "value": ceilings[key], "share": rate / ceilings[key] if rate else None}
        return {
            "op": c.op,
            "name": c.name,
            "primary": c.primary,
            "params": c.params,
            "backward": c.backward,
            "flops": c.flops,
            "bytes": c.bytes,
            "reps": self.reps,
            "calls_per_rep": self.number,
            "elapsed_s": self.elapsed_s,
            "contenders": contenders,
            "ratios": {f"vs_{b}": self.ratio(b) for b in c.baselines} | {"vs_best": self.best_ratio()},
            "ceiling": ceiling,
        }


# op family -> module of its cases; each defines cases(preset) -> list[Case] and FOOTNOTE (how its
# GFLOP/s are counted). One line per op family.
CASE_MODULES = {
    "attention": "bmkernels.bench.attention",
    "gru": "bmkernels.bench.gru",
    "conv": "bmkernels.bench.conv",
    "models": "bmkernels.bench.models",
    "attention_workloads": "bmkernels.bench.attention_workloads",
    "cnn_models": "bmkernels.bench.cnn_models",
}
OPS = tuple(CASE_MODULES)
# what runs without --op: whole CNNs (minutes, with torch.compile) only on request (`--models`)
DEFAULT_OPS = tuple(op for op in OPS if op != "cnn_models")


def case_module(op):
    if op not in CASE_MODULES:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return importlib.import_module(CASE_MODULES[op])


def cases_for(ops=None, preset="default", name_filter=None):
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    out = []
    for op in ops or DEFAULT_OPS:
        out += [c for c in case_module(op).cases(preset) if not name_filter or name_filter in c.name]
    return out


# ----------------------------------------------------------------------------------------------
# Timing engine
# ----------------------------------------------------------------------------------------------


def fwd_bwd(forward):
    """A contender that runs forward, then backward into inp['grad_inputs'] with inp['grad_out']."""

    def run(inp):
        out = forward(inp)
        torch.autograd.grad(out, inp["grad_inputs"], inp["grad_out"])

    return run


def _call(fn, inp, grad, number):
    with torch.set_grad_enabled(grad):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(inp)
        return (time.perf_counter() - t0) / number


def saved_activation_bytes(forward, inp):
    """Bytes of the distinct storages autograd saves for backward during one forward call."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(inp)
    del out
    return sum(storages.values())


def run_case(case, *, reps=None, warmup_s=0.2, budget_s=3.0, min_reps=5, max_reps=50, min_sample_s=0.005, memory=True):
    """Time every contender of `case`, interleaved, and return a Result.

    Warm-up: each contender runs at least twice (once if a call takes over a second) and until
    warmup_s has passed. Calls taking less than min_sample_s are batched so that one sample lasts
    about that long. Repetitions: `reps` if given, else as many as fit in budget_s, clamped to
    [min_reps, max_reps]. In repetition r the contenders run in the order rotated by r.
    """
    start = time.perf_counter()
    names = [n for n in case.contenders if n not in case.skipped]
    inp = case.make_inputs()
    res = Result(case)
    grad = case.backward

    est = {}
    for n in names:
        fn, t0, calls, est[n] = case.contenders[n], time.perf_counter(), 0, math.inf
        while True:
            t = _call(fn, inp, grad, 1)
            calls, est[n] = calls + 1, min(est[n], t)
            if t > 1.0 or (calls >= 2 and time.perf_counter() - t0 >= warmup_s) or calls >= 200:
                break
    number = max(1, math.ceil(min_sample_s / max(min(est.values()), 1e-9)))
    round_s = sum(est.values()) * number
    if reps is None:
        reps = int(min(max_reps, max(min_reps, budget_s // max(round_s, 1e-9))))
    res.reps, res.number = reps, number
    res.times_s = {n: [] for n in names}

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                res.times_s[n].append(_call(case.contenders[n], inp, grad, number))
    finally:
        if gc_was_enabled:
            gc.enable()

    if memory and case.backward:
        for n in names:
            if n in case.forward:
                res.saved_bytes[n] = saved_activation_bytes(case.forward[n], inp)
    del inp
    gc.collect()
    res.elapsed_s = time.perf_counter() - start
    return res


def dram_read_gbps(megabytes=512, reps=5):
    """The machine's DRAM read rate as torch reaches it: the best of `reps` sums over a buffer far
    larger than the caches, on torch's threads (the ceiling of the memory-bound cases)."""
    x = torch.ones(megabytes * 2**20 // 4)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def _best_gflops(fn, flops, budget_s):
    """flops / the fastest of repeated calls of fn (one warm-up call, at least two timed, then until budget_s)."""
    fn()
    best, calls, end = math.inf, 0, time.perf_counter() + budget_s
    while calls < 2 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best, calls = min(best, time.perf_counter() - t0), calls + 1
    return flops / best / 1e9


def gemm_gflops(dtype=torch.float32, n=2048, budget_s=1.0):
    """The GEMM rate torch reaches here: torch.mm on n x n operands of `dtype`, torch's threads, best call."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    return _best_gflops(lambda: torch.mm(a, b), 2.0 * n**3, budget_s)


def conv_gflops(batch=16, budget_s=1.0):
    """The best conv rate ATen reaches here: a 3x3 conv 256 -> 256 channels at 28x28, float32, the
    faster of NCHW and channels_last (oneDNN picks its best algorithm for each)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(batch, 256, 28, 28, generator=g), torch.randn(256, 256, 3, 3, generator=g)
    flops = 2.0 * batch * 256 * 28 * 28 * 256 * 9
    rates = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        with torch.no_grad():
            rates.append(_best_gflops(lambda xf=xf, wf=wf: F.conv2d(xf, wf, padding=1), flops, budget_s / 2))
    return max(rates)


# ceiling key -> (label in the table, unit): what each case's rate is a share of.
CEILINGS = {
    "gemm_fp32_gflops": ("fp32 GEMM", "GFLOP/s"),
    "gemm_bf16_gflops": ("bf16 GEMM", "GFLOP/s"),
    "conv_gflops": ("conv", "GFLOP/s"),
    "dram_read_gbps": ("DRAM", "GB/s"),
}


def measure_ceilings(quick=False):
    """The machine's ceilings (CEILINGS keys): brief measurements (about 1.5 s) when quick, about 5 s otherwise."""
    budget = 0.25 if quick else 1.0
    return {
        "gemm_fp32_gflops": gemm_gflops(torch.float32, 1024 if quick else 2048, budget),
        "gemm_bf16_gflops": gemm_gflops(torch.bfloat16, 1024 if quick else 2048, budget),
        "conv_gflops": conv_gflops(4 if quick else 16, budget),
        "dram_read_gbps": dram_read_gbps(256 if quick else 512, 3 if quick else 5),
    }


def ceiling_key(op, params, flops, bytes_):
    """The ceiling a case is measured against: memory-bound cases (a byte count) the DRAM read rate;
    compute-bound ones the conv rate (conv) or the GEMM rate of their dtype; whole models none."""
    if bytes_:
        return "dram_read_gbps"
    if not flops:
        return None
    if op == "conv":
        return "conv_gflops"
    return f"gemm_{params.get('dtype', 'fp32')}_gflops"


def run(cases, preset="default", reps=None, progress=None):
    """Run cases with the preset's timing knobs; progress(i, n, case, result) after each."""
    knobs = TIMING[preset]
    results = []
    for i, case in enumerate(cases):
        res = run_case(case, reps=reps, **knobs)
        results.append(res)
        if progress:
            progress(i, len(cases), case, res)
    return results


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def environment():
    from bmkernels import _extension

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bmkernels_cpu_isa": _extension.active_cpu_isa() if _extension.loaded() else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": load_average(),
    }


def load_average():
    """1-minute load average (None where unknown): above the core count, other work shared the CPUs."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cell(contender, key, factor, spec):
    if contender.get("skipped"):
        return "skipped"
    value = contender.get(key)
    if value is None:
        return "—"
    return spec(value * factor) if callable(spec) else format(value * factor, spec)


def _ms_text(ms):
    """Milliseconds with two decimals, or three significant digits below 1 ms (a GRU cell step is ~0.005 ms)."""
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def _ratio_cell(x):
    return "—" if x is None else f"{x:.2f}x"


def _ceiling_cell(ceiling):
    if not ceiling or ceiling["share"] is None:
        return "—"
    pct = 100 * ceiling["share"]
    return f"{pct:.{0 if pct >= 10 else 1}f}% {CEILINGS[ceiling['name']][0]}"


def ceilings_line(ceilings):
    """One line naming the measured ceilings, e.g. 'fp32 GEMM 352 GFLOP/s, ..., DRAM 9.8 GB/s'."""
    return ", ".join(
        f"{label} {ceilings[k]:.{1 if unit == 'GB/s' else 0}f} {unit}"
        for k, (label, unit) in CEILINGS.items()
        if ceilings.get(k)
    )


def format_table(results):
    """Markdown tables, one per op, from results as JSON data (Result.to_dict): times, GFLOP/s (GB/s for
    memory-bound ops), the primary's share of its ceiling, ratios (baseline / bmkernels), saved memory."""
    lines, notes = [], []
    by_op = {}  # one table per op and set of contenders (an op's workloads may have different baselines)
    for r in results:
        by_op.setdefault((r["op"], tuple(r["contenders"])), []).append(r)
    for (op, names), rs in by_op.items():
        primary = rs[0].get("primary", BMK)
        baselines = [n for n in names if n != primary]
        any_mem = any("saved_bytes" in d for r in rs for d in r["contenders"].values())
        any_bytes = any(r["bytes"] for r in rs)
        any_rate = any_bytes or any(r["flops"] for r in rs)  # whole models count neither
        any_ceiling = any(r.get("ceiling") for r in rs)
        head = (
            ["case", "reps"]
            + [f"{n} ms" for n in names]
            + ([f"{n} GB/s" if any_bytes else f"{n} GFLOP/s" for n in names] if any_rate else [])
            + ([f"{primary} % ceiling"] if any_ceiling else [])
            + [f"vs {b}" for b in baselines]
            + ["vs best"]
        )
        if any_mem:
            head.append("saved MiB " + " / ".join(names))
        lines += [f"### {op}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        for r in rs:
            cs = r["contenders"]
            row = [r["name"], str(r["reps"])]
            row += [_cell(cs[n], "median_ms", 1, _ms_text) for n in names]
            if any_rate:
                row += [_cell(cs[n], "gbps" if any_bytes else "gflops", 1, ".1f") for n in names]
            if any_ceiling:
                row.append(_ceiling_cell(r.get("ceiling")))
            row += [_ratio_cell(r["ratios"].get(f"vs_{b}")) for b in baselines] + [_ratio_cell(r["ratios"]["vs_best"])]
            if any_mem:
                if any("saved_bytes" in d for d in cs.values()):
                    row.append(" / ".join(_cell(cs[n], "saved_bytes", 1 / 2**20, ".1f") for n in names))
                else:
                    row.append("—")
            lines.append("| " + " | ".join(row) + " |")
            notes += [f"- {r['name']}: {d['skipped']}" for d in cs.values() if d.get("skipped")]
        lines += ["", case_module(op).FOOTNOTE, ""]
    lines += [
        "Times are medians over the reps (ms per call); contenders were interleaved in rotating order",
        "in one process after a warm-up. vs X = X time / bmkernels time (> 1: bmkernels faster);",
        "vs best = against the fastest baseline. % ceiling: bmkernels' GFLOP/s over the GEMM rate of its",
        "dtype (conv: the best ATen conv rate), or its GB/s over the DRAM read rate (memory-bound cases),",
        "all measured at the start of the run. saved MiB (fwd+bwd only): saved activation memory, the",
        "distinct storages autograd keeps between forward and backward for one call (inputs included),",
        "measured with saved_tensors_hooks; not a process peak.",
    ]
    if notes:
        lines += ["", "Skipped:"] + notes
    return "\n".join(lines)


def to_json(results, preset, total_s, env=None, ceilings=None):
    """env: environment() taken at the start of the run (its load average then); the end's is added.
    ceilings: measure_ceilings() of the start of the run (None with --no-ceilings)."""
    env = dict(env or environment())
    env["load_average_end"] = load_average()
    return {
        "preset": preset,
        "total_s": total_s,
        "environment": env,
        "ceilings": ceilings,
        "results": [r.to_dict(ceilings) for r in results],
    }


def print_progress(i, n, case, res, stream=sys.stderr):
    med = ", ".join(f"{k} {_ms_text(res.median(k) * 1e3)} ms" for k in res.times_s)
    print(
        f"[{i + 1}/{n}] {case.op} {case.name}: {med} ({res.reps} reps, {res.elapsed_s:.1f} s)", file=stream, flush=True
    )
