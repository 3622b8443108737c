"""What `bmkernels bench` makes of its results without running anything: plots (`--plot DIR`, from a
run or `--from-json FILE`) and the generated tables of docs/benchmarks.md and README.md."""

import json
import pathlib
import sys

import pytest

from bmkernels import bench, cli
from bmkernels.bench import report

REPO = pathlib.Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CEILINGS = {"gemm_fp32_gflops": 400.0, "gemm_bf16_gflops": 1600.0, "conv_gflops": 300.0, "dram_read_gbps": 20.0}


def synthetic_results():
    """A results JSON over the quick cases of every op family, with made-up times and memory."""
    results = []
    for op in bench.OPS:
        for i, case in enumerate(bench.case_module(op).cases("quick")):
            names = [n for n in case.contenders if n not in case.skipped]
            res = bench.Result(case, reps=1, times_s={n: [1e-3 * (i + 1) * (j + 1)] for j, n in enumerate(names)})
            if case.backward and case.forward:
                res.saved_bytes = {n: 2**20 * (j + 1) for j, n in enumerate(names)}
            results.append(res)
    return bench.to_json(results, "quick", 1.0, env={"threads": 2}, ceilings=CEILINGS)


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "results.json"
    path.write_text(json.dumps(synthetic_results()))
    return path


@pytest.mark.slow
def test_plot_from_json_writes_pngs(results_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "--from-json", str(results_file), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "### attention" in out and "Plots written:" in out  # the tables, re-printed, then the plots
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    expected = ["attention_memory.png", "attention_time.png", "conv_layers.png", "gru_hidden.png"]
    if any(r["op"] in ("models", "cnn_models") for r in json.loads(results_file.read_text())["results"]):
        expected.append("models.png")
    assert files == sorted(expected)
    for name in files:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_plot_without_matplotlib_is_a_clear_error(results_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert cli.main(["bench", "--from-json", str(results_file), "--plot", str(tmp_path)]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_from_json_of_a_bad_file_fails(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": 3}')
    assert cli.main(["bench", "--from-json", str(bad)]) == 1
    assert "cannot read --from-json" in capsys.readouterr().err
    assert cli.main(["bench", "--from-json", str(tmp_path / "missing.json")]) == 1


@pytest.mark.parametrize("region", sorted(report.REGIONS))
def test_generated_region_equals_the_script_output(region):
    """docs/benchmarks.md's tables and README's headline are what report.py makes of the file they name."""
    text = (REPO / report.REGIONS[region]).read_text()
    match = report.region_pattern(region).search(text)
    assert match, f"{report.REGIONS[region]} has no {region} region"
    data = json.loads((REPO / match["file"]).read_text())
    assert match[0] == report.render(region, match["file"], data), (
        f"{report.REGIONS[region]} is stale: run `python -m bmkernels.bench.report {match['file']}`"
    )


def test_results_file_is_named_by_date_and_cpu():
    data = synthetic_results()
    data["environment"] |= {"date": "2026-12-03T13:00Z", "processor": "Intel(R) Xeon(R) Processor", "cpus": 2}
    assert report.results_name(data) == "2026-12-03-intel-xeon-2cpu.json"


def test_rewrite_replaces_only_the_region():
    data = synthetic_results()
    data["environment"] |= {"date": "2026-12-03T13:00Z"}
    text = f"before\n{report.BEGIN.format(region='bench-headline', file='x.json')}\nold\n"
    text += report.END.format(region="bench-headline") + "\nafter\n"
    new = report.rewrite(text, "bench-headline", "x.json", data)
    assert new.startswith("before\n") and new.endswith("\nafter\n") and "old" not in new
    assert "| attention |" in new and report.rewrite(new, "bench-headline", "x.json", data) == new
    with pytest.raises(ValueError, match="no bench-tables region"):
        report.rewrite(text, "bench-tables", "x.json", data)
