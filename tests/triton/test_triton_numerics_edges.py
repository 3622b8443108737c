"""The numerics-at-the-edges cases of tests/ops/test_numerics_edges.py on the Triton kernels (under the
interpreter here, about 1 s a case): NaN and +-inf where torch has them, finite where torch is finite.
CI runs the cases that found differences and one of each kind; the rest are `exhaustive`."""

import pytest
import torch

pytest.importorskip("bmkernels.triton.attention", reason="triton is not installed")

from tests.ops.test_numerics_edges import (  # noqa: E402
    ACTIVATIONS,
    ATTENTION_EDGES,
    CONV_EDGES,
    GRU_EDGES,
    check_attention_edge,
    check_conv_edge,
    check_gru_edge,
)


def _ci_subset(cases, in_ci):
    return [
        pytest.param(*c, marks=() if c in in_ci else pytest.mark.exhaustive, id="-".join(map(str, c))) for c in cases
    ]


ATTENTION_CI = {("q nan", torch.float32), ("bias +inf entry", torch.float32)}
# gelu_tanh: its derivative's 1 - tanh^2 lost tanh's digits near +-1 (1.2x the tolerance), now sech^2 directly
CONV_CI = {
    ("x nan", "relu"),
    ("weight -inf", None),
    ("depthwise weight -inf", None),
    ("depthwise weight -inf", "gelu_tanh"),
}
GRU_CI = {("x nan",)}


@pytest.mark.parametrize(
    "name,dtype", _ci_subset([(n, d) for n in ATTENTION_EDGES for d in (torch.float32, torch.float16)], ATTENTION_CI)
)
def test_attention_edges(name, dtype):
    check_attention_edge(name, dtype, "triton")


@pytest.mark.parametrize("name,activation", _ci_subset([(n, a) for n in CONV_EDGES for a in ACTIVATIONS], CONV_CI))
def test_conv_edges(name, activation):
    check_conv_edge(name, activation, torch.float32, "triton")


@pytest.mark.parametrize("name", _ci_subset([(n,) for n in GRU_EDGES], GRU_CI))
def test_gru_edges(name):
    check_gru_edge(name, torch.float32, "triton")
