"""Each argument table in bmkernels/ops (what the fakes and the Python backward wiring read by name) mirrors
its operator's schema in csrc/registration.cpp: names, order, kinds and defaults. So does each C++ argument
struct (csrc/common/*_params.h): its types the dispatcher checks when the library loads, its names here."""

import pytest
import torch

from bmkernels import _extension
from bmkernels.ops import attention, batch_norm, conv, gru
from bmkernels.ops._common import REQUIRED, bind, call_args

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="compiled extension not built")

TABLES = {
    "attention_fwd": attention.ATTENTION_FWD,
    "attention_bwd": attention.ATTENTION_BWD,
    "attention_emulated_fwd": attention.ATTENTION_FWD,
    "attention_emulated_bwd": attention.ATTENTION_BWD,
    "conv2d_fwd": conv.CONV2D_FWD,
    "conv2d_bwd": conv.CONV2D_BWD,
    "conv2d_emulated_fwd": conv.CONV2D_FWD,
    "conv2d_emulated_bwd": conv.CONV2D_BWD,
    "batch_norm_act_fwd": batch_norm.BATCH_NORM_ACT_FWD,
    "batch_norm_act_bwd": batch_norm.BATCH_NORM_ACT_BWD,
    "gru_cell_fwd": gru.GRU_CELL_FWD,
    "gru_layer_fwd": gru.GRU_LAYER_FWD,
    "gru_layer_bwd": gru.GRU_LAYER_BWD,
    "gru_cell_emulated_fwd": gru.GRU_CELL_FWD,
    "gru_layer_emulated_fwd": gru.GRU_LAYER_FWD,
    "gru_layer_emulated_bwd": gru.GRU_LAYER_BWD,
}

# op -> its C++ argument struct's names (csrc/common/op_params.h)
CPP_ARG_NAMES = _extension.require("test_op_tables").op_arg_names() if _extension.loaded() else {}


def schema_rows(op):
    """(name, type as the schema text writes it, default) per argument."""
    schema = getattr(torch.ops.bmkernels, op).default._schema
    rows = []
    for a in schema.arguments:
        kind = str(a.type).replace("Optional[Tensor]", "Tensor?")
        if a.N is not None:  # fixed-size lists: int[2], bool[4]
            kind = f"{kind.removeprefix('List[').removesuffix(']')}[{a.N}]"
        rows.append((a.name, kind, a.default_value if a.has_default_value() else REQUIRED))
    return rows


@pytest.mark.parametrize("op", sorted(TABLES))
def test_table_matches_schema(op):
    if not hasattr(torch.ops.bmkernels, op):
        pytest.skip(f"{op} is not in this build")
    assert [tuple(a) for a in TABLES[op]] == schema_rows(op)


@pytest.mark.parametrize("op", sorted(CPP_ARG_NAMES))
def test_cpp_argument_struct_matches_schema(op):
    if not hasattr(torch.ops.bmkernels, op):
        pytest.skip(f"{op} is not in this build")
    assert list(CPP_ARG_NAMES[op]) == [name for name, _, _ in schema_rows(op)]


def test_bind_fills_defaults_takes_keywords_and_refuses_bad_calls():
    table = attention.ATTENTION_FWD
    args = list(range(13))
    bound = bind(table, args, {"segments": "s"})
    assert bound["key_range"] is None and bound["segments"] == "s" and bound["dropout_p"] == 12
    assert call_args(table, bound) == (*args, None, "s", None)
    with pytest.raises(TypeError, match="expected the arguments"):
        bind(table, args[:12])
    with pytest.raises(TypeError, match="expected the arguments"):
        bind(table, args, {"not_an_arg": 1})


def test_fake_takes_trailing_arguments_by_keyword():
    """torch.ops passes a defaulted argument given by name as a keyword: the fake binds it like the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 5, 8)
        kr = torch.zeros(1, 2, dtype=torch.int64)
        op = torch.ops.bmkernels.attention_fwd
        out, lse = op(q, q, q, None, None, None, None, 0.35, 0.0, -1, -1, 0, 0.0, key_range=kr)
    assert out.shape == (1, 2, 5, 8) and lse.shape == (1, 2, 5) and lse.dtype == torch.float32
