"""GPU benchmark of the Triton conv2d kernels (bmkernels/triton/conv.py) and, where compiled, the CUDA C++
ones (csrc/cuda/conv*: "cuda" is v1, cuDNN through ATen + fused epilogue; "cuda_igemm" is v2, our
implicit-GEMM forward with BMK_CUDA_CONV_ENGINE=igemm, v1 where v2 does not apply; column v1/v2 > 1: v2 is
faster) against cuDNN (F.conv2d with its bias) followed by the eager epilogue (+ residual, activation),
reporting TFLOP/s. Skipped without a CUDA GPU (the Triton interpreter's timings mean nothing).

    python -m pytest benchmarks/bench_triton_conv.py --benchmark-only
    python benchmarks/bench_triton_conv.py          # one interleaved table, medians

Layers: ResNet-18's distinct convs and a MobileNetV2 depthwise 3x3 (bmkernels/bench/conv.py), batch 32,
with a residual on the stride-1 layers and ReLU (the ResNet block's fused tail). Both contenders get
the same NCHW or channels_last tensors. Timing: triton.testing.do_bench (CUDA events, L2 flushed
between calls), the two contenders of a case measured alternately three times each, median kept.
FLOPs as bmkernels.bench.conv counts them (x3 for forward + backward). cuDNN runs float32 in TF32
only if torch.backends.cudnn.allow_tf32 (True by default); the Triton kernels use IEEE float32, so
compare float32 rows with that in mind.
"""

import os
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

from bmkernels.bench.conv import DEPTHWISE_LAYERS, LAYOUTS, RESNET18_LAYERS, conv_flops

NO_GPU = "the Triton conv benchmark needs a CUDA GPU"
if not torch.cuda.is_available():
    if __name__ == "__main__":
        sys.exit(NO_GPU)
    pytest.skip(NO_GPU, allow_module_level=True)

import triton  # noqa: E402

import bmkernels  # noqa: E402
from benchmarks.bench_triton_attention import measure  # noqa: E402  (do_bench, L2 flushed)
from benchmarks.conftest import run_gpu_benchmark  # noqa: E402
from bmkernels import _extension  # noqa: E402

BATCH = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONTENDERS = ("triton", *(("cuda", "cuda_igemm") if "conv2d" in _extension.cuda_kernels() else ()), "cudnn")


def make_case(layer, dtype, layout, backward):
    _, c_in, c_out, size, kernel, stride, padding, groups = layer
    fmt = LAYOUTS[layout]
    out_hw = (size + 2 * padding - kernel) // stride + 1
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, device="cuda", generator=gen) * scale
        return t.to(dtype).contiguous(memory_format=fmt if t.dim() == 4 else torch.contiguous_format)

    x, w, b = rand(BATCH, c_in, size, size), rand(c_out, c_in // groups, kernel, kernel, scale=0.05), rand(c_out)
    residual = rand(BATCH, c_out, out_hw, out_hw) if stride == 1 and c_in == c_out else None
    leaves = (x, w, b) + ((residual,) if residual is not None else ())
    for t in leaves:
        t.requires_grad_(backward)
    grad = rand(BATCH, c_out, out_hw, out_hw)

    def run(contender):
        if contender in ("triton", "cuda", "cuda_igemm"):
            # the CUDA op reads the engine per call
            os.environ["BMK_CUDA_CONV_ENGINE"] = "igemm" if contender == "cuda_igemm" else "aten"
            backend = "cuda" if contender == "cuda_igemm" else contender
            out = bmkernels.conv2d(
                x, w, b, stride, padding, 1, groups, activation="relu", residual=residual, backend=backend
            )
        else:
            out = F.conv2d(x, w, b, stride, padding, 1, groups)
            out = F.relu(out + residual if residual is not None else out)
        if backward:
            torch.autograd.grad(out, leaves, grad)

    return run, conv_flops(BATCH, c_in, c_out, out_hw, kernel, groups, backward)


def case_params():
    for layer in RESNET18_LAYERS + DEPTHWISE_LAYERS:
        for dtype_name in DTYPES:
            for layout in LAYOUTS:
                for backward in (False, True):
                    name = f"{layer[0]} {dtype_name} {layout} {'fwd+bwd' if backward else 'fwd'}"
                    yield name, (layer, DTYPES[dtype_name], layout, backward)


CASES = list(case_params())


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n.replace(" ", "-") for n, _ in CASES])
def test_triton_conv(benchmark, case, contender):
    run, flops = make_case(*case)
    run_gpu_benchmark(benchmark, run, flops, case, contender, measure, rounds=20, warmup_rounds=3)


def main():
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"batch {BATCH}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
    )
    both = "cuda_igemm" in CONTENDERS
    print(
        f"{'case':<40} "
        + " ".join(f"{c + ' ms':>10} {'TFLOP/s':>8}" for c in CONTENDERS)
        + f" {'cudnn/best':>10}"
        + (f" {'v1/v2':>6}" if both else "")
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
            f"{name:<40} "
            + " ".join(f"{med[c]:>10.3f} {flops / med[c] / 1e9:>8.1f}" for c in CONTENDERS)
            + f" {med['cudnn'] / best:>10.2f}"
            + (f" {med['cuda'] / med['cuda_igemm']:>6.2f}" if both else "")
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
