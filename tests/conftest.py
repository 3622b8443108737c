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
    """Tests start without backend/ISA overrides from the caller's shell."""
    monkeypatch.delenv("BMK_BACKEND", raising=False)
    monkeypatch.delenv("BMK_CPU_ISA", raising=False)
