"""GPU benchmark of the Triton attention kernels (bmkernels/triton/attention.py) and, in a CUDA build,
the CUDA C++ kernels (csrc/cuda/) against PyTorch's SDPA (its FlashAttention backend where it
applies), reporting TFLOP/s. Skipped without a CUDA GPU
(the Triton interpreter's timings mean nothing).

    python -m pytest benchmarks/bench_triton_attention.py --benchmark-only
    python benchmarks/bench_triton_attention.py          # one interleaved table, medians

Timing: triton.testing.do_bench (CUDA events, L2 flushed between calls), the two contenders of a
case measured alternately three times each, median kept. FLOPs as bmkernels.bench.attention
counts them (4 B H L^2 D forward, halved for causal; fwd+bwd 3.5x forward).
"""

import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

from bmkernels.bench.attention import attention_flops

NO_GPU = "the Triton attention benchmark needs a CUDA GPU"
if not torch.cuda.is_available():
    if __name__ == "__main__":
        sys.exit(NO_GPU)
    pytest.skip(NO_GPU, allow_module_level=True)

import triton  # noqa: E402

import bmkernels  # noqa: E402
from benchmarks.conftest import run_gpu_benchmark  # noqa: E402
from bmkernels import _extension  # noqa: E402

# (batch, q_heads, kv_heads, length, head_dim)
SHAPES = (
    (4, 16, 16, 1024, 64),
    (2, 16, 16, 4096, 64),
    (2, 16, 16, 4096, 128),
    (1, 32, 8, 8192, 128),
    (2, 16, 16, 2048, 256),
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONTENDERS = ("triton", *(("cuda",) if "attention" in _extension.cuda_kernels() else ()), "sdpa")


def make_case(shape, dtype, causal, backward):
    batch, q_heads, kv_heads, length, head_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(heads):
        return torch.randn(
            batch, heads, length, head_dim, device="cuda", dtype=dtype, generator=gen, requires_grad=backward
        )

    q, k, v = rand(q_heads), rand(kv_heads), rand(kv_heads)
    grad = torch.randn(batch, q_heads, length, head_dim, device="cuda", dtype=dtype, generator=gen)
    gqa = q_heads != kv_heads

    def run(contender):
        if contender in ("triton", "cuda"):
            out = bmkernels.attention(q, k, v, causal=causal, backend=contender)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)

    flops = attention_flops(batch, q_heads, length, length, head_dim, causal, backward)
    return run, flops


def case_params():
    for shape in SHAPES:
        for dtype_name in DTYPES:
            for causal in (False, True):
                for backward in (False, True):
                    name = (
                        f"B{shape[0]} H{shape[1]}/{shape[2]} L{shape[3]} D{shape[4]} {dtype_name}"
                        f"{' causal' if causal else ''} {'fwd+bwd' if backward else 'fwd'}"
                    )
                    yield name, (shape, DTYPES[dtype_name], causal, backward)


def measure(run, contender, reps=3):
    return [
        triton.testing.do_bench(lambda: run(contender), warmup=25, rep=100, return_mode="median") for _ in range(reps)
    ]


CASES = list(case_params())


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n.replace(" ", "-") for n, _ in CASES])
def test_triton_attention(benchmark, case, contender):
    run, flops = make_case(*case)
    run_gpu_benchmark(benchmark, run, flops, case, contender, measure, rounds=20, warmup_rounds=3)


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'case':<52}" + "".join(f" {c + ' ms':>10} {'TFLOP/s':>8}" for c in CONTENDERS) + f" {'sdpa/triton':>11}")
    for name, case in CASES:
        run, flops = make_case(*case)
        for contender in CONTENDERS:
            run(contender)
        times = {c: [] for c in CONTENDERS}
        for _ in range(3):  # interleaved
            for contender in CONTENDERS:
                times[contender] += measure(run, contender, reps=1)
        med = {c: statistics.median(t) for c, t in times.items()}
        cells = "".join(f" {med[c]:>10.3f} {flops / med[c] / 1e9:>8.1f}" for c in CONTENDERS)
        print(f"{name:<52}{cells} {med['sdpa'] / med['triton']:>11.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
