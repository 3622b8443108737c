"""Each argument table in bmkernels/ops (what the fakes and the Python backward wiring read by name) mirrors
its operator's schema in csrc/registration.cpp: names, order, kinds and defaults."""

import pytest
import torch

from bmkernels import _extension
from bmkernels.ops import attention
from bmkernels.ops._common import REQUIRED, bind, call_args

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="compiled extension not built")

TABLES = {
    "attention_fwd": attention.ATTENTION_FWD,
    "attention_bwd": attention.ATTENTION_BWD,
    "attention_emulated_fwd": attention.ATTENTION_FWD,
    "attention_emulated_bwd": attention.ATTENTION_BWD,
}


def schema_rows(op):
    schema = getattr(torch.ops.bmkernels, op).default._schema
    return [(a.name, str(a.type), a.default_value if a.has_default_value() else REQUIRED) for a in schema.arguments]


@pytest.mark.parametrize("op", sorted(TABLES))
def test_table_matches_schema(op):
    if not hasattr(torch.ops.bmkernels, op):
        pytest.skip(f"{op} is not in this build")
    table_rows = [(a.name, a.kind.replace("Tensor?", "Optional[Tensor]"), a.default) for a in TABLES[op]]
    assert table_rows == schema_rows(op)


def test_bind_fills_defaults_takes_keywords_and_refuses_bad_calls():
    table = attention.ATTENTION_FWD
    args = list(range(13))
    bound = bind(table, args, {"segments": "s"})
    assert bound["key_range"] is None and bound["segments"] == "s" and bound["dropout_p"] == 12
    assert call_args(table, bound) == (*args, None, "s")
    with pytest.raises(TypeError, match="expected the arguments"):
        bind(table, args[:12])
    with pytest.raises(TypeError, match="expected the arguments"):
        bind(table, args, {"not_an_arg": 1})
