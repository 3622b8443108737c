"""pytest setup of the bmkernels suite. The helpers (tolerance rule, input makers) live in bmkernels.testing."""

import os

import pytest
import torch

# Without a GPU, the Triton kernels can run only under the interpreter, and triton decides that when it
# is first imported (its standard library, tl.rand among it, is built then): switch the interpreter on
# before anything of the suite (torchvision, torch.compile, a Triton test file) imports triton, so that
# every Triton test file runs in the one pytest process of `pytest tests`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Tests start without backend/ISA overrides from the caller's shell; BMK_TEST_CPU_ISA runs the
    whole suite on one CPU instruction set (`make test-asan` runs it once on scalar)."""
    monkeypatch.delenv("BMK_BACKEND", raising=False)
    monkeypatch.delenv("BMK_CPU_ISA", raising=False)
    if os.environ.get("BMK_TEST_CPU_ISA"):
        monkeypatch.setenv("BMK_CPU_ISA", os.environ["BMK_TEST_CPU_ISA"])


def pytest_addoption(parser):
    parser.addoption(
        "--exhaustive",
        action="store_true",
        help="also run the tests marked exhaustive (beyond CI's time budget; `make test-all`)",
    )


def pytest_collection_modifyitems(config, items):
    """Markers by subject folder, GPU-only tests skipped without a GPU, exhaustive ones deselected unless asked."""
    on_gpu = torch.cuda.is_available()
    kept, deselected = [], []
    for item in items:
        folder = item.path.parent.name
        if folder == "triton" and not on_gpu:
            item.add_marker(pytest.mark.interpreter)
        if folder == "cuda":
            item.add_marker(pytest.mark.emulator)
        gpu = item.get_closest_marker("gpu")
        if gpu is not None and not on_gpu:
            item.add_marker(pytest.mark.skip(reason=gpu.kwargs.get("reason", "needs a CUDA GPU")))
        if item.get_closest_marker("exhaustive") is not None and not config.getoption("--exhaustive"):
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
