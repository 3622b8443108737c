"""The `bmkernels` command and the benchmark engine behind it. Checks the shape of what is reported
(rows, columns, finite positive ratios), never how fast anything is."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import bmkernels
from bmkernels import bench, cli
from bmkernels.bench import attention as attention_bench
from bmkernels.bench import gru as gru_bench

REPO = str(pathlib.Path(__file__).resolve().parents[2])


def run_cli(*args, timeout=120):
    env = dict(os.environ)
    env.pop("BMK_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "bmkernels", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def table_rows(stdout):
    """The markdown table of `bmkernels bench` as (header, {case name: cells})."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, stdout
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    header, rows = split[0], split[2:]
    assert set(split[1]) == {"---"}
    return header, {r[0]: dict(zip(header, r, strict=True)) for r in rows}


def parse_ratio(cell):
    assert cell.endswith("x"), cell
    return float(cell[:-1])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out" / "quick.json"
    proc = run_cli("bench", "--quick", "--op", "attention", "--json", str(path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc, path


@pytest.mark.skipif(not bmkernels.build_info()["extension_loaded"], reason="compiled extension not built")
@pytest.mark.slow
class TestBenchQuick:
    def test_table_rows_and_columns(self, quick_run):
        proc, _ = quick_run
        header, rows = table_rows(proc.stdout)
        expected = [c.name for c in attention_bench.cases("quick")]
        assert list(rows) == expected
        for col in (
            "case",
            "reps",
            "bmkernels ms",
            "sdpa ms",
            "eager ms",
            "bmkernels GFLOP/s",
            "sdpa GFLOP/s",
            "eager GFLOP/s",
            "vs sdpa",
            "vs eager",
            "vs best",
            "saved MiB bmkernels / sdpa / eager",
            "bmkernels % ceiling",
        ):
            assert col in header, header
        assert "Total:" in proc.stdout

    def test_share_of_the_ceiling_of_each_dtype(self, quick_run):
        proc, _ = quick_run
        assert "# ceilings (" in proc.stdout and "fp32 GEMM" in proc.stdout and "DRAM" in proc.stdout
        _, rows = table_rows(proc.stdout)
        for name, row in rows.items():
            share, label = row["bmkernels % ceiling"].split("% ", 1)
            assert float(share) >= 0, (name, row)
            assert label == ("bf16 GEMM" if " bf16 " in name else "fp32 GEMM"), (name, label)

    def test_ratios_and_times_are_positive_finite(self, quick_run):
        proc, _ = quick_run
        _, rows = table_rows(proc.stdout)
        for name, row in rows.items():
            assert int(row["reps"]) >= 5, name
            for col in ("vs sdpa", "vs eager", "vs best"):
                r = parse_ratio(row[col])
                assert math.isfinite(r) and r > 0, (name, col, row[col])
            for col in ("bmkernels ms", "sdpa ms", "eager ms", "bmkernels GFLOP/s"):
                v = float(row[col])
                assert math.isfinite(v) and v > 0, (name, col, row[col])
            # vs best is the ratio against the faster baseline.
            best = min(parse_ratio(row["vs sdpa"]), parse_ratio(row["vs eager"]))
            assert parse_ratio(row["vs best"]) == pytest.approx(best, abs=0.011)

    def test_saved_memory_reported_for_backward_cases(self, quick_run):
        proc, _ = quick_run
        _, rows = table_rows(proc.stdout)
        col = "saved MiB bmkernels / sdpa / eager"
        for name, row in rows.items():
            if name.startswith("fwd+bwd"):
                values = [float(x) for x in row[col].split(" / ")]
                assert len(values) == 3 and all(v > 0 for v in values), (name, row[col])
            else:
                assert row[col] == "—"

    def test_json(self, quick_run):
        proc, path = quick_run
        data = json.loads(path.read_text())
        assert data["preset"] == "quick" and data["total_s"] > 0
        assert data["environment"]["threads"] >= 1
        assert [r["name"] for r in data["results"]] == [c.name for c in attention_bench.cases("quick")]
        for r in data["results"]:
            assert set(r["contenders"]) == {"bmkernels", "sdpa", "eager"}
            for c in r["contenders"].values():
                assert len(c["times_ms"]) == r["reps"] and c["median_ms"] > 0
            assert all(v > 0 for v in r["ratios"].values())
        assert set(data["ceilings"]) == set(bench.CEILINGS)
        assert all(v > 0 and math.isfinite(v) for v in data["ceilings"].values())
        for r in data["results"]:
            c = r["ceiling"]
            assert c["name"] == f"gemm_{r['params']['dtype']}_gflops" and c["value"] == data["ceilings"][c["name"]]
            assert c["share"] == pytest.approx(r["contenders"]["bmkernels"]["gflops"] / c["value"])

    def test_filter_and_reps(self):
        proc = run_cli("bench", "--quick", "--filter", "fwd bf16", "--reps", "3", "--no-memory", "--no-ceilings")
        assert proc.returncode == 0, proc.stderr
        header, rows = table_rows(proc.stdout)
        assert "bmkernels % ceiling" not in header and "# ceilings" not in proc.stdout
        assert list(rows) == ["fwd bf16 full 2x4x128x32"]
        assert rows["fwd bf16 full 2x4x128x32"]["reps"] == "3"
        assert "below the protocol" in proc.stdout


@pytest.mark.slow
def test_info_prints_isa():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    info = bmkernels.build_info()
    assert "active CPU ISA" in proc.stdout
    if info["extension_loaded"]:
        line = next(line for line in proc.stdout.splitlines() if line.startswith("active CPU ISA"))
        assert line.split()[-1] == info["active_cpu_isa"]
        assert ", ".join(info["cpu_isas"]) in proc.stdout


@pytest.mark.slow
def test_info_json():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(bmkernels.build_info()))


def run_main(capsys, *args):
    """cli.main in process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "--reps", "0"], "must be a positive integer"),
        (["bench", "--reps", "many"], "must be a positive integer"),
        (["bench", "--op", "fft"], "invalid choice: 'fft'"),
        (["bench", "--quick", "--full"], "not allowed with"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_command_line(capsys, args, message):
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert message in err and "usage: bmkernels" in err


@pytest.mark.slow
def test_bad_flag_exit_status_of_the_command():
    proc = run_cli("bench", "--bogus")
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr


def test_no_command_prints_help(capsys):
    code, _, err = run_main(capsys)
    assert code == 2 and "usage: bmkernels" in err


def test_no_matching_case_fails(capsys):
    code, _, err = run_main(capsys, "bench", "--quick", "--filter", "no such case")
    assert code == 1
    assert "bmkernels bench: error: no quick case matches" in err


def test_list_cases(capsys):
    code, out, _ = run_main(capsys, "bench", "--full", "--list", "--op", "attention")
    assert code == 0
    assert len(out.splitlines()) == 24  # 3 shapes x 2 dtypes x causal/full x fwd/fwd+bwd


def test_list_covers_every_op_family(capsys):
    code, out, _ = run_main(capsys, "bench", "--full", "--list")
    assert code == 0
    assert {"attention", "conv", "gru"} <= set(bench.OPS)
    assert len(out.splitlines()) == sum(len(bench.case_module(op).cases("full")) for op in bench.DEFAULT_OPS)


def test_models_flag_lists_the_whole_cnn_cases(capsys):
    code, out, _ = run_main(capsys, "bench", "--models", "--list")
    assert code == 0
    lines = out.splitlines()
    assert lines and all(line.startswith("cnn_models ") for line in lines)
    assert "cnn_models resnet18 train B=8 160px cl  (bmkernels, eager, compiled)" in lines
    assert "cnn_models" not in bench.DEFAULT_OPS, "whole CNNs run only when asked for"


# -- the engine, in process --------------------------------------------------------------------


def test_presets():
    full = {c.name: c for c in attention_bench.cases("full")}
    default = attention_bench.cases("default")
    assert len(full) == 24 and {c.name for c in default} < set(full)
    # fp32 forward at every shape, fwd+bwd at the two smaller, bf16 forward at L=512.
    assert sum(c.name.startswith("fwd fp32") for c in default) == 6
    assert sum(c.name.startswith("fwd+bwd fp32") for c in default) == 4
    assert sum(c.name.startswith("fwd bf16") for c in default) == 2
    assert all("4096" not in c.name for c in default if c.backward)
    # Eager math is skipped where its L x L buffers would not fit: fp32 fwd+bwd at L=4096.
    assert "eager" in full["fwd+bwd fp32 full 1x16x4096x128"].skipped
    assert "eager" not in full["fwd fp32 full 1x16x4096x128"].skipped
    assert all(not c.skipped for c in default)
    with pytest.raises(ValueError, match="preset"):
        attention_bench.cases("huge")


def test_attention_flops():
    assert attention_bench.attention_flops(4, 8, 512, 512, 64) == 4 * 4 * 8 * 512 * 512 * 64
    assert attention_bench.attention_flops(4, 8, 512, 512, 64, causal=True) == 2 * 4 * 8 * 512 * 512 * 64
    assert attention_bench.attention_flops(1, 1, 10, 10, 2, backward=True) == 3.5 * 4 * 100 * 2
    case = attention_bench.cases("quick")[2]
    assert case.backward and case.flops == attention_bench.attention_flops(2, 4, 128, 128, 32, backward=True)


def test_run_case_interleaves_in_rotating_order():
    calls = []

    def contender(name):
        return lambda inp: calls.append(name)

    case = bench.Case(
        op="toy", name="toy", make_inputs=dict, flops=1.0, contenders={n: contender(n) for n in ("a", "b", "c")}
    )
    res = bench.run_case(case, reps=4, warmup_s=0.0, min_sample_s=0.0)
    measured = calls[-12:]  # after the warm-up calls
    assert measured == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert res.reps == 4 and all(len(t) == 4 for t in res.times_s.values())


# -- ceilings ---------------------------------------------------------------------------------


def test_ceiling_of_each_kind_of_case():
    assert bench.ceiling_key("attention", {"dtype": "bf16"}, 1.0, 0.0) == "gemm_bf16_gflops"
    assert bench.ceiling_key("gru", {}, 1.0, 0.0) == "gemm_fp32_gflops"
    assert bench.ceiling_key("conv", {}, 1.0, 0.0) == "conv_gflops"
    assert bench.ceiling_key("attention_workloads", {"dtype": "bf16"}, 1.0, 8.0) == "dram_read_gbps"
    assert bench.ceiling_key("models", {}, 0.0, 0.0) is None


def _toy_result(op, flops, bytes_=0.0, ms=2.0):
    case = bench.Case(op=op, name="toy", make_inputs=dict, flops=flops, bytes=bytes_, contenders={"bmkernels": None})
    res = bench.Result(case, reps=1, times_s={"bmkernels": [ms / 1e3]})
    return res


def test_share_of_the_ceiling_in_json_and_table():
    ceilings = {"gemm_fp32_gflops": 400.0, "gemm_bf16_gflops": 1600.0, "conv_gflops": 300.0, "dram_read_gbps": 20.0}
    gemm = _toy_result("gru", flops=2e8).to_dict(ceilings)  # 100 GFLOP/s
    dram = _toy_result("attention_workloads", flops=1e6, bytes_=3e7).to_dict(ceilings)  # 15 GB/s
    models = _toy_result("models", flops=0.0).to_dict(ceilings)
    assert gemm["ceiling"] == {"name": "gemm_fp32_gflops", "value": 400.0, "share": pytest.approx(0.25)}
    assert dram["ceiling"]["share"] == pytest.approx(0.75) and models["ceiling"] is None
    _, rows = table_rows(bench.format_table([gemm]))
    assert rows["toy"]["bmkernels % ceiling"] == "25% fp32 GEMM"
    _, rows = table_rows(bench.format_table([dram]))
    assert rows["toy"]["bmkernels % ceiling"] == "75% DRAM" and rows["toy"]["bmkernels GB/s"] == "15.0"
    header, _ = table_rows(bench.format_table([_toy_result("gru", flops=2e8).to_dict()]))
    assert "bmkernels % ceiling" not in header  # --no-ceilings
    assert (
        bench.ceilings_line(ceilings)
        == "fp32 GEMM 400 GFLOP/s, bf16 GEMM 1600 GFLOP/s, conv 300 GFLOP/s, DRAM 20.0 GB/s"
    )


@pytest.mark.slow
def test_measure_ceilings_quick_is_brief_and_positive():
    import time

    start = time.perf_counter()
    ceilings = bench.measure_ceilings(quick=True)
    assert time.perf_counter() - start < 20  # seconds even on a loaded machine
    assert set(ceilings) == set(bench.CEILINGS)
    assert all(math.isfinite(v) and v > 0 for v in ceilings.values())


def test_eager_attention_matches_sdpa():
    import torch

    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_bench.eager_attention(q, k, v, mask), ref)


def test_saved_activation_bytes_sees_the_score_matrix():
    import torch

    q, k, v = (torch.randn(1, 1, 64, 8, requires_grad=True) for _ in range(3))
    inp = {"q": q, "k": k, "v": v}
    eager = bench.saved_activation_bytes(lambda i: attention_bench.eager_attention(i["q"], i["k"], i["v"]), inp)
    # q, k, v (3 x 64 x 8 floats) and the 64 x 64 probabilities.
    assert eager == (3 * 64 * 8 + 64 * 64) * 4


# -- GRU cases ---------------------------------------------------------------------------------


@pytest.mark.skipif(not bmkernels.build_info()["extension_loaded"], reason="compiled extension not built")
@pytest.mark.slow
def test_gru_bench_quick():
    proc = run_cli("bench", "--quick", "--op", "gru", "--reps", "3", "--no-memory", "--no-ceilings", timeout=300)
    assert proc.returncode == 0, proc.stderr
    header, rows = table_rows(proc.stdout)
    assert list(rows) == [c.name for c in gru_bench.cases("quick")]
    for col in ("bmkernels ms", "torch.nn ms", "bmkernels GFLOP/s", "vs torch.nn", "vs best"):
        assert col in header, header
    for name, row in rows.items():
        r = parse_ratio(row["vs torch.nn"])
        assert math.isfinite(r) and r > 0 and float(row["bmkernels ms"]) > 0, (name, row)


def test_gru_presets_and_flops():
    default = [c.name for c in gru_bench.cases("default")]
    for shape in ("128x32x256x256 L1", "64x64x512x512 L1", "256x8x128x128 L1", "64x32x256x256 L2 bi"):
        assert f"fwd layer {shape}" in default and f"fwd+bwd layer {shape}" in default, shape
    assert "fwd cell 1x256x256" in default and "fwd cell 32x256x256" in default
    assert set(default) < {c.name for c in gru_bench.cases("full")}
    assert gru_bench.gru_flops(128, 32, 256, 256) == 2 * 128 * 32 * 3 * 256 * (256 + 256)
    # layer 2 of a bidirectional GRU reads 2H inputs; fwd+bwd is 3x forward
    assert gru_bench.gru_flops(1, 1, 4, 2, 2, True) == 2 * (2 * 6 * (4 + 2) + 2 * 6 * (4 + 2))
    assert gru_bench.gru_flops(1, 1, 4, 2, backward=True) == 3 * 2 * 6 * 6
    with pytest.raises(ValueError, match="preset"):
        gru_bench.cases("huge")


# -- conv cases ---------------------------------------------------------------------------------


@pytest.mark.skipif(not bmkernels.build_info()["extension_loaded"], reason="compiled extension not built")
@pytest.mark.slow
def test_bench_quick_conv():
    from bmkernels.bench import conv as conv_bench

    proc = run_cli("bench", "--quick", "--op", "conv", "--reps", "5", "--no-memory", timeout=300)
    assert proc.returncode == 0, proc.stderr
    header, rows = table_rows(proc.stdout)
    assert list(rows) == [c.name for c in conv_bench.cases("quick")]
    for name, row in rows.items():
        for col in ("vs eager", "vs best"):
            r = parse_ratio(row[col])
            assert math.isfinite(r) and r > 0, (name, col, row[col])
        assert row["bmkernels % ceiling"].endswith("% conv"), row  # the conv rate, not the GEMM rate


def test_conv_presets_and_flops():
    from bmkernels.bench import conv as conv_bench

    default = conv_bench.cases("default")
    # 11 ResNet-18 layers + 1 depthwise, x 2 layouts x fwd / fwd+bwd
    assert len(default) == 48 and len(conv_bench.cases("full")) == 48
    assert {c.name for c in conv_bench.cases("small")} < {c.name for c in default}
    assert conv_bench.conv_flops(16, 512, 512, 7, 3, 1) == 2 * 16 * 512 * 49 * 512 * 9
    assert conv_bench.conv_flops(2, 8, 8, 5, 3, 8, backward=True) == 3 * 2 * 2 * 8 * 25 * 9


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention_workloads_varlen_contenders_run(backward):
    """Every contender of the varlen case runs once on a tiny batch (the fwd+bwd case once failed:
    its padded views were made before their bases required grad)."""
    from bmkernels.bench import attention_workloads

    case = attention_workloads._varlen_case(backward, lengths=(5, 1, 3), heads=2, dim=8)
    res = bench.run_case(case, reps=1, warmup_s=0.0, min_sample_s=0.0)
    assert set(res.times_s) == set(case.contenders) and all(len(t) == 1 for t in res.times_s.values())
