"""GPU benchmark of the Triton GRU kernels (bmkernels/triton/gru.py) and, where compiled, the CUDA C++ ones
(csrc/cuda/gru*: "cuda" is cuBLAS GEMMs + fused gate kernels per step; "cuda_persistent" the persistent
forward, BMK_CUDA_GRU_ENGINE=persistent, per step where it does not fit) against cuDNN (torch.nn.GRU on CUDA), reporting
TFLOP/s. Skipped without a CUDA GPU (the Triton interpreter's timings mean nothing).
Both Triton paths are measured on every shape (the persistent kernels and the per-step kernels), so
the table shows where bmkernels.triton.gru.PERSISTENT_MAX_HIDDEN should sit.

    python -m pytest benchmarks/bench_triton_gru.py --benchmark-only
    python benchmarks/bench_triton_gru.py          # one interleaved table, medians

Timing: triton.testing.do_bench (CUDA events, L2 flushed between calls), the three contenders of a
case measured alternately three times each, median kept. FLOPs as bmkernels.bench.gru counts them
(2 T B 3H (I + H) per layer and direction; fwd+bwd 3x forward).
"""

import os
import statistics
import sys

import pytest
import torch

from bmkernels.bench.gru import gru_flops

NO_GPU = "the Triton GRU benchmark needs a CUDA GPU"
if not torch.cuda.is_available():
    if __name__ == "__main__":
        sys.exit(NO_GPU)
    pytest.skip(NO_GPU, allow_module_level=True)

import triton  # noqa: E402

import bmkernels  # noqa: E402
from benchmarks.conftest import run_gpu_benchmark  # noqa: E402
from bmkernels import _extension  # noqa: E402
from bmkernels.triton import gru as triton_gru  # noqa: E402

# (T, B, I, H, num_layers, bidirectional)
SHAPES = (
    (128, 32, 256, 256, 1, False),
    (128, 64, 512, 512, 1, False),
    (256, 16, 1024, 1024, 1, False),
    (64, 128, 256, 256, 2, True),
    (512, 8, 128, 128, 1, False),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CUDA = ("cuda", "cuda_persistent") if "gru" in _extension.cuda_kernels() else ()
CONTENDERS = ("persistent", "per_step", *CUDA, "cudnn")


def make_case(shape, dtype, backward):
    steps, batch, input_size, hidden, layers, bi = shape
    torch.manual_seed(0)
    module = torch.nn.GRU(input_size, hidden, layers, bidirectional=bi).to("cuda", dtype)
    module.requires_grad_(backward)
    x = torch.randn(steps, batch, input_size, device="cuda", dtype=dtype, requires_grad=backward)
    grad = torch.randn(steps, batch, (2 if bi else 1) * hidden, device="cuda", dtype=dtype)
    params = [x, *module._flat_weights]

    def run(contender):
        if contender != "cudnn":
            # the CUDA op reads the engine per call
            os.environ["BMK_CUDA_GRU_ENGINE"] = "persistent" if contender == "cuda_persistent" else "steps"
            if contender not in CUDA:
                triton_gru.PERSISTENT_MAX_HIDDEN = 1 << 30 if contender == "persistent" else 0
            out, _ = bmkernels.gru(
                x,
                None,
                module._flat_weights,
                num_layers=layers,
                bidirectional=bi,
                batch_first=False,
                dropout=0.0,
                training=False,
                backend="cuda" if contender in CUDA else "triton",
            )
        else:
            out, _ = module(x)
        if backward:
            torch.autograd.grad(out, params, grad)

    return run, gru_flops(steps, batch, input_size, hidden, layers, bi, backward)


def case_params():
    for shape in SHAPES:
        for dtype_name in DTYPES:
            for backward in (False, True):
                steps, batch, input_size, hidden, layers, bi = shape
                name = (
                    f"T{steps} B{batch} I{input_size} H{hidden} L{layers}{' bi' if bi else ''} {dtype_name} "
                    f"{'fwd+bwd' if backward else 'fwd'}"
                )
                yield name, (shape, DTYPES[dtype_name], backward)


def measure(run, contender, reps=3):
    return [
        triton.testing.do_bench(lambda: run(contender), warmup=10, rep=50, return_mode="median") for _ in range(reps)
    ]


CASES = list(case_params())


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n.replace(" ", "-") for n, _ in CASES])
def test_triton_gru(benchmark, case, contender):
    run, flops = make_case(*case)
    run_gpu_benchmark(benchmark, run, flops, case, contender, measure, rounds=10, warmup_rounds=2)


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(
        f"{'case':<44} " + " ".join(f"{c + ' ms':>14} {'TFLOP/s':>8}" for c in CONTENDERS) + f" {'cudnn/best bmk':>17}"
    )
    for name, case in CASES:
        run, flops = make_case(*case)
        for contender in CONTENDERS:
            run(contender)
        times = {c: [] for c in CONTENDERS}
        for _ in range(3):  # interleaved
            for contender in CONTENDERS:
                times[contender] += measure(run, contender, reps=1)
        med = {c: statistics.median(t) for c, t in times.items()}
        best = min(t for c, t in med.items() if c != "cudnn")
        print(
            f"{name:<44} "
            + " ".join(f"{med[c]:>14.3f} {flops / med[c] / 1e9:>8.2f}" for c in CONTENDERS)
            + f" {med['cudnn'] / best:>17.2f}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
