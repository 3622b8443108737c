"""The softcap's float tanh coefficients in csrc/cpu/attention.cpp are the ones tools/fit_tanh.py fits."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fit_module():
    spec = importlib.util.spec_from_file_location("fit_tanh", ROOT / "tools" / "fit_tanh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_kernel_coefficients_are_the_fit_and_within_5_ulp():
    fit = _fit_module()
    p, q = fit.fit(8.0)
    body = re.search(r"Vec<T> fast_tanh\(.*?\n}\n", (ROOT / "csrc/cpu/attention.cpp").read_text(), re.S).group(0)
    numbers = [float(v) for v in re.findall(r"T\(([-+0-9.e]+)\)", body)]
    # the kernel's order: the bound, P from its highest term down to 1, Q likewise
    assert numbers[0] == 8.0
    np.testing.assert_allclose(numbers[1 : 1 + len(p)], p[::-1], rtol=1e-8)
    np.testing.assert_allclose(numbers[1 + len(p) :], q[::-1], rtol=1e-8)
    x = np.linspace(-12, 12, 200001, dtype=np.float32)
    ref = np.tanh(x.astype(np.float64))
    err = np.abs(fit.evaluate_float32(x, p, q, 8.0) - ref) / np.spacing(np.abs(ref).astype(np.float32))
    assert err.max() < 5 and np.abs(fit.evaluate_float32(np.float32([np.inf, -np.inf]), p, q, 8.0)).max() <= 1
