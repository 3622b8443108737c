"""Each Triton op (bmkernels::<family>_triton_<op>) has the schema of its C++ twin (bmkernels::<family>_<op>):
the same argument names, types, order and defaults and the same returns, so the Python wrappers call either
with one argument list."""

import pytest
import torch

from bmkernels import _extension

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="compiled extension not built")

# importing the modules registers their triton_ops
for _module in ("attention", "conv", "gru"):
    pytest.importorskip(f"bmkernels.triton.{_module}")

FAMILIES = ("attention", "conv2d", "gru")


def schemas():
    return {s.name: s for s in torch._C._jit_get_all_schemas() if s.name.startswith("bmkernels::")}


def triton_pairs():
    """(triton op, C++ op) names: bmkernels::gru_triton_layer_fwd <-> bmkernels::gru_layer_fwd."""
    names = schemas()
    pairs = []
    for name in sorted(names):
        for family in FAMILIES:
            prefix = f"bmkernels::{family}_triton_"
            if name.startswith(prefix):
                pairs.append((name, f"bmkernels::{family}_{name[len(prefix) :]}"))
    return pairs


def signature(schema):
    args = [
        (a.name, str(a.type), a.kwarg_only, None if not a.has_default_value() else repr(a.default_value))
        for a in schema.arguments
    ]
    return args, [str(r.type) for r in schema.returns]


def test_every_family_has_triton_ops():
    families = {cpp.split("::")[1].split("_")[0] for _, cpp in triton_pairs()}
    assert families == set(FAMILIES), triton_pairs()


@pytest.mark.parametrize(("triton_name", "cpp_name"), triton_pairs())
def test_triton_schema_matches_the_cpp_one(triton_name, cpp_name):
    all_schemas = schemas()
    assert cpp_name in all_schemas, f"{triton_name} has no C++ twin {cpp_name}"
    (t_args, t_returns), (c_args, c_returns) = signature(all_schemas[triton_name]), signature(all_schemas[cpp_name])
    assert [a[0] for a in t_args] == [a[0] for a in c_args], "argument names or order differ"
    assert t_args == c_args, "argument types, kinds or defaults differ"
    assert t_returns == c_returns, "returns differ"
