"""The CPU kernels called from several Python threads at once (a data loader's workers, a serving process):
every thread's outputs and gradients bitwise equal to the same call made alone. The kernels share the CPU
buffer pool and the conv engine's choice cache; a race there shows up as a wrong or differing result."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.ops import test_out_of_bounds as oob

THREADS = 4
CASES = [
    (oob.attention_cases, "bias_mask_causal"),
    (oob.attention_cases, "padding_mask_softcap_lse"),
    (oob.conv_cases, "stride2_relu"),
    (oob.gru_cases, "layers_lengths"),
    (oob.batch_norm_cases, "relu"),
]


def results(cases, name):
    fn, tensors = cases("cpu")[name]
    fresh = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in tensors.items()}
    return oob.run(fn, fresh, lambda t: t)


@pytest.mark.parametrize("cases,name", CASES, ids=[name for _, name in CASES])
def test_threads_match_a_lone_call(cases, name):
    alone = results(cases, name)
    with ThreadPoolExecutor(THREADS) as pool:
        runs = list(pool.map(lambda _: results(cases, name), range(3 * THREADS)))
    for run in runs:
        assert len(run) == len(alone)
        for got, expected in zip(run, alone, strict=True):
            assert torch.equal(got, expected)
