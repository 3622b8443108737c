"""Implicit-GEMM Triton kernels for bmkernels.conv2d (forward and backward).

Semantics are those of bmkernels/reference/conv.py (the CPU op's contract); the operators
torch.ops.bmkernels.conv2d_triton_fwd / conv2d_triton_bwd take exactly the arguments of the C++
conv2d_fwd / conv2d_bwd, so bmkernels/ops/conv.py checks arguments once for both. Activation codes
and math mirror csrc/common/activations.h.

- forward: one program per (block of output pixels (n, oh, ow), block of output channels, group);
  the reduction runs over the kernel taps (kh, kw) and, inside each tap, over input-channel blocks,
  so no im2col buffer exists. Epilogue in float32: + bias, + residual, (pre-activation stored when
  asked), activation, one store in x's dtype. Depthwise convs (one input channel per group, any
  channel multiplier) have direct multiply-add kernels instead, forward and backward: a GEMM over
  one channel would waste the tensor cores.
- backward: one elementwise pass over grad_out computes dZ = grad_out * act'(saved) (the output or
  the pre-activation), which is also the residual gradient, plus per-block partial column sums for
  the bias gradient; then dX as an implicit GEMM over (taps, output-channel blocks) per block of
  input pixels of one stride residue class (taps that cannot reach the class are skipped), and dW
  as a GEMM over output pixels, split into slices whose float32 partial sums are added afterwards.
  No atomics: deterministic.
- any strides: NCHW, channels_last and non-contiguous tensors go through the same kernels; outputs
  keep x's memory format. Padding is (top, bottom, left, right), so "same" with even kernels works.
- float16, bfloat16, float32 (GEMMs in the input dtype with float32 accumulation; float32 GEMMs in
  IEEE precision, not TF32). float64 has no Triton path: use the CPU kernel or the reference.

Import this module only with triton importable; under TRITON_INTERPRET=1 it must also be imported
after the variable is set (triton decides at decoration time), and uses one small fixed config.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from bmkernels.ops import conv as ops_conv
from bmkernels.triton.attention import _tanh, tuned

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"
# output pixels per weight-gradient slice: enough slices to fill a GPU when channels are few
PIXELS_PER_SPLIT = 64 if INTERPRETED else 2048
MAX_SPLIT = 64


def _configs(blocks, interpreted, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    """Autotune configs (blocks..., warps, stages) for A100/H100; one small fixed config under the
    interpreter, which runs programs one after another."""
    blocks = [interpreted] if INTERPRETED else tuned(blocks)
    return [triton.Config(dict(zip(names, b[:-2], strict=True)), num_warps=b[-2], num_stages=b[-1]) for b in blocks]


# forward and dX: M = pixels, N = channels, K = channels of one tap
_GEMM_CONFIGS = _configs(
    [
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 32, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 32, 16, 2, 4),
        (32, 32, 16, 2, 3),
        (128, 128, 64, 8, 3),
    ],
    (64, 16, 16, 1, 1),
)
# dW: M = output channels, N = (c, kh, kw) columns, K = output pixels
_DWEIGHT_CONFIGS = _configs(
    [
        (64, 128, 64, 4, 3),
        (128, 128, 32, 8, 3),
        (64, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (32, 64, 64, 4, 3),
        (16, 64, 64, 2, 3),
    ],
    (16, 32, 64, 1, 1),
)
# depthwise (no GEMM: one input channel per group): M = pixels, N = channels
_DEPTHWISE_CONFIGS = _configs(
    [(64, 64, 4, 2), (128, 32, 4, 2), (32, 128, 4, 2), (128, 64, 8, 2), (256, 16, 4, 2)],
    (64, 16, 1, 1),
    names=("BLOCK_M", "BLOCK_N"),
)
_KEY = ["M", "GROUPS", "CIN_G", "COUT_G", "KH", "KW"]
DZ_BLOCK_P, DZ_BLOCK_C = (64, 16) if INTERPRETED else (64, 64)
_LAST_ACTIVATION = 7  # bmk::kLastActivation (csrc/common/activations.h): the codes _activation knows


@triton.jit
def _tanh_sech2(u):
    """tanh(u) and 1 - tanh(u)^2 from e = exp(-2|u|): sech^2 = 4e / (1 + e)^2 has no cancellation, where
    1 - t * t loses the digits of t near +-1 (then times s^3 in gelu_tanh's derivative)."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _activation(z, slope, ACT: tl.constexpr):
    """bmk::activation_forward on a float32 tile (codes of bmk::Activation)."""
    y = z
    if ACT == 1:
        y = tl.where(z <= 0, 0.0, z)  # NaN stays NaN, as in torch.relu
    elif ACT == 2:
        y = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.70710678118654752440))
    elif ACT == 4:
        y = 0.5 * z * (1.0 + _tanh(0.79788456080286535588 * (z + 0.044715 * z * z * z)))
    elif ACT == 5:
        y = z / (1.0 + tl.exp(-z))
    elif ACT == 6:
        y = tl.where(z < 0, 0.0, tl.where(z > 6, 6.0, z))  # NaN stays NaN, as F.relu6
    elif ACT == 7:
        y = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    return y


@triton.jit
def _activation_derivative(s, slope, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """d act / dz from the saved tile s: the output y (bmk::activation_derivative_from_output) or the
    pre-activation z (bmk::activation_derivative)."""
    d = tl.full(s.shape, 1.0, tl.float32)
    if FROM_OUTPUT:
        if ACT == 1:
            d = tl.where(s <= 0, 0.0, 1.0)  # 1 at NaN, as torch's threshold_backward
        elif ACT == 2:
            d = tl.where(s > 0, 1.0, slope)
    elif ACT == 1:
        d = tl.where(s <= 0, 0.0, 1.0)
    elif ACT == 2:
        d = tl.where(s > 0, 1.0, slope)
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(s * 0.70710678118654752440))
        d = cdf + s * 0.39894228040143267794 * tl.exp(-0.5 * s * s)
    elif ACT == 4:
        t, sech2 = _tanh_sech2(0.79788456080286535588 * (s + 0.044715 * s * s * s))
        s_capped = tl.minimum(tl.maximum(s, -1000.0), 1000.0)  # as bmk::activation_derivative: 0 * finite
        d = 0.5 * (1.0 + t) + 0.5 * s * sech2 * 0.79788456080286535588 * (1.0 + 3 * 0.044715 * s_capped * s_capped)
    elif ACT == 5:
        sig = 1.0 / (1.0 + tl.exp(-s))
        d = sig * (1.0 + s * (1.0 - sig))
    elif ACT == 6:
        d = tl.where((s <= 0) | (s >= 6), 0.0, 1.0)  # torch's hardtanh_backward: 0 at exactly 0 and 6
    elif ACT == 7:
        d = tl.where(s <= -3, 0.0, tl.where(s < 3, s / 3.0 + 0.5, 1.0))
    return d


@triton.jit
def _pixels(p, OH, OW):
    """(n as int64, row, column) of flattened pixel indices p over (N, OH, OW)."""
    n = p // (OH * OW)
    r = p % (OH * OW)
    return n.to(tl.int64), r // OW, r % OW


@triton.jit
def _epilogue(
    acc,
    n,
    oh,
    ow,
    oc,
    in_rows,
    in_oc,
    Bias,
    Res,
    Out,
    Preact,
    sb,
    srn,
    src,
    srh,
    srw,
    son,
    soc,
    soh,
    sow,
    slope,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    ACT: tl.constexpr,
):
    """z = acc + bias + residual (float32); stores z (when asked) and act(z) in the output's dtype."""
    inside = in_rows[:, None] & in_oc[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + oc * sb, mask=in_oc, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res = tl.load(Res + (n * srn + oh * srh + ow * srw)[:, None] + oc[None, :] * src, mask=inside, other=0.0)
        acc += res.to(tl.float32)
    out_offsets = (n * son + oh * soh + ow * sow)[:, None] + oc[None, :] * soc
    if SAVE_PREACT:  # Preact is laid out like Out
        tl.store(Preact + out_offsets, acc.to(Preact.dtype.element_ty), mask=inside)
    tl.store(Out + out_offsets, _activation(acc, slope, ACT).to(Out.dtype.element_ty), mask=inside)


@triton.autotune(configs=_GEMM_CONFIGS, key=_KEY)
@triton.jit
def _fwd_kernel(
    X,
    W,
    Bias,
    Res,
    Out,
    Preact,
    sxn,
    sxc,
    sxh,
    sxw,
    swo,
    swc,
    swh,
    sww,
    sb,
    srn,
    src,
    srh,
    srw,
    son,
    soc,
    soh,
    sow,
    H,
    WIDTH,
    OH,
    OW,
    M,
    GROUPS,
    CIN_G,
    COUT_G,
    KH,
    KW,
    stride_h,
    stride_w,
    pad_t,
    pad_l,
    dil_h,
    dil_w,
    slope,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Implicit GEMM: output pixels x this group's output channels, reduced over taps x input channels."""
    g = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    oc = g * COUT_G + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < M
    in_oc = oc < (g + 1) * COUT_G
    n, oh, ow = _pixels(rows, OH, OW)
    x_rows = X + n * sxn + (g * CIN_G).to(tl.int64) * sxc
    w_cols = W + oc.to(tl.int64) * swo
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_t + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_l + kw * dil_w
            ok = in_rows & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WIDTH)
            x_tap = x_rows + ih * sxh + iw * sxw
            w_tap = w_cols + kh * swh + kw * sww
            for c0 in range(0, CIN_G, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                in_c = c < CIN_G
                xt = tl.load(x_tap[:, None] + c[None, :] * sxc, mask=ok[:, None] & in_c[None, :], other=0.0)
                wt = tl.load(w_tap[None, :] + c[:, None] * swc, mask=in_c[:, None] & in_oc[None, :], other=0.0)
                acc += tl.dot(xt, wt, input_precision="ieee")
    _epilogue(
        acc,
        n,
        oh,
        ow,
        oc,
        in_rows,
        in_oc,
        Bias,
        Res,
        Out,
        Preact,
        sb,
        srn,
        src,
        srh,
        srw,
        son,
        soc,
        soh,
        sow,
        slope,
        HAS_BIAS,
        HAS_RES,
        SAVE_PREACT,
        ACT,
    )


@triton.autotune(configs=_DEPTHWISE_CONFIGS, key=_KEY)
@triton.jit
def _depthwise_fwd_kernel(
    X,
    W,
    Bias,
    Res,
    Out,
    Preact,
    sxn,
    sxc,
    sxh,
    sxw,
    swo,
    swc,
    swh,
    sww,
    sb,
    srn,
    src,
    srh,
    srw,
    son,
    soc,
    soh,
    sow,
    H,
    WIDTH,
    OH,
    OW,
    M,
    GROUPS,
    CIN_G,
    COUT_G,
    KH,
    KW,
    stride_h,
    stride_w,
    pad_t,
    pad_l,
    dil_h,
    dil_w,
    slope,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One input channel per group (CIN_G = 1, COUT_G = the channel multiplier): a direct
    multiply-add per tap over output pixels x all output channels."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    oc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < M
    in_oc = oc < GROUPS * COUT_G
    n, oh, ow = _pixels(rows, OH, OW)
    x_cols = (oc // COUT_G).to(tl.int64) * sxc
    w_cols = W + oc.to(tl.int64) * swo
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_t + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_l + kw * dil_w
            ok = in_rows & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WIDTH)
            xt = tl.load(
                X + (n * sxn + ih * sxh + iw * sxw)[:, None] + x_cols[None, :],
                mask=ok[:, None] & in_oc[None, :],
                other=0.0,
            )
            wt = tl.load(w_cols + kh * swh + kw * sww, mask=in_oc, other=0.0)
            acc += xt.to(tl.float32) * wt.to(tl.float32)[None, :]
    _epilogue(
        acc,
        n,
        oh,
        ow,
        oc,
        in_rows,
        in_oc,
        Bias,
        Res,
        Out,
        Preact,
        sb,
        srn,
        src,
        srh,
        srw,
        son,
        soc,
        soh,
        sow,
        slope,
        HAS_BIAS,
        HAS_RES,
        SAVE_PREACT,
        ACT,
    )


@triton.jit
def _dz_kernel(
    G,
    S,
    DZ,
    BiasPartial,
    sgn,
    sgc,
    sgh,
    sgw,
    ssn,
    ssc,
    ssh,
    ssw,
    sdn,
    sdc,
    sdh,
    sdw,
    M,
    C,
    OH,
    OW,
    slope,
    ACT: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dZ = grad_out * act'(saved), stored in the input dtype; bias partial sums (float32) per pixel block."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, oh, ow = _pixels(rows, OH, OW)
    inside = (rows < M)[:, None] & (cols < C)[None, :]
    grad = tl.load(G + (n * sgn + oh * sgh + ow * sgw)[:, None] + cols[None, :] * sgc, mask=inside, other=0.0)
    saved = tl.load(S + (n * ssn + oh * ssh + ow * ssw)[:, None] + cols[None, :] * ssc, mask=inside, other=0.0)
    dz = grad.to(tl.float32) * _activation_derivative(saved.to(tl.float32), slope, ACT, FROM_OUTPUT)
    dz = tl.where(inside, dz, 0.0)
    tl.store(
        DZ + (n * sdn + oh * sdh + ow * sdw)[:, None] + cols[None, :] * sdc, dz.to(DZ.dtype.element_ty), mask=inside
    )
    tl.store(BiasPartial + tl.program_id(0).to(tl.int64) * C + cols, tl.sum(dz, 0), mask=cols < C)


@triton.jit
def _source_pixel(i, pad, k, dil, stride, OUT):
    """The output row (or column) o with o * stride - pad + k * dil = i, and whether it exists."""
    num = i + pad - k * dil
    num = tl.where(num >= 0, num, -1)  # keep // and % on non-negatives; -1 fails the check below
    o = num // stride
    return o, (num >= 0) & (num % stride == 0) & (o < OUT)


@triton.autotune(configs=_GEMM_CONFIGS, key=_KEY)
@triton.jit
def _dx_kernel(
    DZ,
    W,
    DX,
    sdn,
    sdc,
    sdh,
    sdw,
    swo,
    swc,
    swh,
    sww,
    sxn,
    sxc,
    sxh,
    sxw,
    H,
    WIDTH,
    OH,
    OW,
    M,
    GROUPS,
    CIN_G,
    COUT_G,
    KH,
    KW,
    stride_h,
    stride_w,
    pad_t,
    pad_l,
    dil_h,
    dil_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dX[n, c, ih, iw] = sum over taps and this group's output channels o of dZ[n, o, oh, ow] W[o, c, kh, kw]
    where ih = oh * stride - pad + kh * dil. A program takes input pixels of one stride residue class
    (ih % stride_h, iw % stride_w: program axis 2 with the group), which the same taps reach, so taps
    that reach none are skipped rather than masked (M = N * ceil(H / stride_h) * ceil(W / stride_w))."""
    g = tl.program_id(2) // (stride_h * stride_w)
    residue = tl.program_id(2) % (stride_h * stride_w)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, qh, qw = _pixels(rows, tl.cdiv(H, stride_h), tl.cdiv(WIDTH, stride_w))
    ih = qh * stride_h + residue // stride_w
    iw = qw * stride_w + residue % stride_w
    in_rows = (rows < M) & (ih < H) & (iw < WIDTH)
    in_c = c < CIN_G
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in range(KH):
        # exact multiples of the stride (the residue test holds for the whole class): // is exact, even below 0
        if ((residue // stride_w + pad_t - kh * dil_h) % stride_h + stride_h) % stride_h == 0:
            oh = (ih + pad_t - kh * dil_h) // stride_h
            for kw in range(KW):
                if ((residue % stride_w + pad_l - kw * dil_w) % stride_w + stride_w) % stride_w == 0:
                    ow = (iw + pad_l - kw * dil_w) // stride_w
                    ok = in_rows & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
                    dz_tap = DZ + n * sdn + oh * sdh + ow * sdw
                    w_tap = W + c * swc + kh * swh + kw * sww
                    for o0 in range(0, COUT_G, BLOCK_K):
                        o = o0 + tl.arange(0, BLOCK_K)
                        in_o = o < COUT_G
                        oc = (g * COUT_G + o).to(tl.int64)
                        dzt = tl.load(dz_tap[:, None] + oc[None, :] * sdc, mask=ok[:, None] & in_o[None, :], other=0.0)
                        wt = tl.load(w_tap[None, :] + oc[:, None] * swo, mask=in_o[:, None] & in_c[None, :], other=0.0)
                        # rows with no such output pixel add nothing, not 0 * w (NaN for an infinite weight)
                        acc += tl.where(ok[:, None], tl.dot(dzt, wt, input_precision="ieee"), 0.0)
    cin = (g * CIN_G + c).to(tl.int64)
    tl.store(
        DX + (n * sxn + ih * sxh + iw * sxw)[:, None] + cin[None, :] * sxc,
        acc.to(DX.dtype.element_ty),
        mask=in_rows[:, None] & in_c[None, :],
    )


@triton.autotune(configs=_DEPTHWISE_CONFIGS, key=_KEY)
@triton.jit
def _depthwise_dx_kernel(
    DZ,
    W,
    DX,
    sdn,
    sdc,
    sdh,
    sdw,
    swo,
    swc,
    swh,
    sww,
    sxn,
    sxc,
    sxh,
    sxw,
    H,
    WIDTH,
    OH,
    OW,
    M,
    GROUPS,
    CIN_G,
    COUT_G,
    KH,
    KW,
    stride_h,
    stride_w,
    pad_t,
    pad_l,
    dil_h,
    dil_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dX[n, c, ih, iw] = sum over taps and the channel multiplier m of dZ[n, c * COUT_G + m, oh, ow]
    W[c * COUT_G + m, 0, kh, kw]; input pixels x all input channels."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < M
    in_c = c < GROUPS
    n, ih, iw = _pixels(rows, H, WIDTH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in range(KH):
        oh, ok_h = _source_pixel(ih, pad_t, kh, dil_h, stride_h, OH)
        for kw in range(KW):
            ow, ok_w = _source_pixel(iw, pad_l, kw, dil_w, stride_w, OW)
            ok = in_rows & ok_h & ok_w
            for m in range(COUT_G):
                oc = (c * COUT_G + m).to(tl.int64)
                dzt = tl.load(
                    DZ + (n * sdn + oh * sdh + ow * sdw)[:, None] + oc[None, :] * sdc,
                    mask=ok[:, None] & in_c[None, :],
                    other=0.0,
                )
                wt = tl.load(W + oc * swo + kh * swh + kw * sww, mask=in_c, other=0.0)
                acc += tl.where(ok[:, None], dzt.to(tl.float32) * wt.to(tl.float32)[None, :], 0.0)  # see _dx_kernel
    tl.store(
        DX + (n * sxn + ih * sxh + iw * sxw)[:, None] + c.to(tl.int64)[None, :] * sxc,
        acc.to(DX.dtype.element_ty),
        mask=in_rows[:, None] & in_c[None, :],
    )


@triton.autotune(configs=_DWEIGHT_CONFIGS, key=_KEY)
@triton.jit
def _dweight_kernel(
    DZ,
    X,
    Partial,
    sdn,
    sdc,
    sdh,
    sdw,
    sxn,
    sxc,
    sxh,
    sxw,
    H,
    WIDTH,
    OH,
    OW,
    M,
    GROUPS,
    CIN_G,
    COUT_G,
    KH,
    KW,
    stride_h,
    stride_w,
    pad_t,
    pad_l,
    dil_h,
    dil_w,
    PIXELS_PER_SLICE,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial[slice, g, o, (kh, kw, c)] = sum over this slice's output pixels of dZ[n, o, oh, ow] x[n, c, ih, iw]
    (M = N * OH * OW output pixels); the slices are summed afterwards. Columns run over c fastest, so
    channels_last x tiles are read along contiguous channels."""
    g = tl.program_id(2) % GROUPS
    piece = tl.program_id(2) // GROUPS
    o = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_total = CIN_G * KH * KW
    in_o = o < COUT_G
    in_cols = cols < k_total
    kh = cols // (KW * CIN_G)
    kw = (cols // CIN_G) % KW
    c = cols % CIN_G
    oc = (g * COUT_G + o).to(tl.int64)
    x_cols = X + (g * CIN_G + c).to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    p_lo = piece * PIXELS_PER_SLICE
    p_hi = tl.minimum(p_lo + PIXELS_PER_SLICE, M)
    for p0 in range(p_lo, p_hi, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        in_p = p < p_hi
        n, oh, ow = _pixels(p, OH, OW)
        dzt = tl.load(
            DZ + oc[:, None] * sdc + (n * sdn + oh * sdh + ow * sdw)[None, :],
            mask=in_o[:, None] & in_p[None, :],
            other=0.0,
        )
        ih = (oh * stride_h - pad_t)[:, None] + kh[None, :] * dil_h
        iw = (ow * stride_w - pad_l)[:, None] + kw[None, :] * dil_w
        ok = in_p[:, None] & in_cols[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WIDTH)
        xt = tl.load(x_cols[None, :] + (n * sxn)[:, None] + ih * sxh + iw * sxw, mask=ok, other=0.0)
        acc += tl.dot(dzt, xt, input_precision="ieee")
    offsets = (tl.program_id(2).to(tl.int64) * COUT_G + o[:, None]) * k_total + cols[None, :]
    tl.store(Partial + offsets, acc, mask=in_o[:, None] & in_cols[None, :])


@triton.autotune(configs=_DEPTHWISE_CONFIGS, key=_KEY)
@triton.jit
def _depthwise_dweight_kernel(
    DZ,
    X,
    Partial,
    sdn,
    sdc,
    sdh,
    sdw,
    sxn,
    sxc,
    sxh,
    sxw,
    H,
    WIDTH,
    OH,
    OW,
    M,
    GROUPS,
    CIN_G,
    COUT_G,
    KH,
    KW,
    stride_h,
    stride_w,
    pad_t,
    pad_l,
    dil_h,
    dil_w,
    PIXELS_PER_SLICE,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial[slice, oc, (kh, kw)] = sum over this slice's output pixels of dZ[n, oc, oh, ow]
    x[n, oc // COUT_G, ih, iw] for one tap (program axis 1) and a block of output channels."""
    oc = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tap = tl.program_id(1)
    piece = tl.program_id(2)
    kh = tap // KW
    kw = tap % KW
    in_oc = oc < GROUPS * COUT_G
    x_cols = (oc // COUT_G).to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    p_lo = piece * PIXELS_PER_SLICE
    p_hi = tl.minimum(p_lo + PIXELS_PER_SLICE, M)
    for p0 in range(p_lo, p_hi, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        in_p = p < p_hi
        n, oh, ow = _pixels(p, OH, OW)
        dzt = tl.load(
            DZ + (n * sdn + oh * sdh + ow * sdw)[:, None] + oc.to(tl.int64)[None, :] * sdc,
            mask=in_p[:, None] & in_oc[None, :],
            other=0.0,
        )
        ih = oh * stride_h - pad_t + kh * dil_h
        iw = ow * stride_w - pad_l + kw * dil_w
        ok = in_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WIDTH)
        xt = tl.load(
            X + (n * sxn + ih * sxh + iw * sxw)[:, None] + x_cols[None, :], mask=ok[:, None] & in_oc[None, :], other=0.0
        )
        acc += dzt.to(tl.float32) * xt.to(tl.float32)
    tl.store(Partial + (piece.to(tl.int64) * GROUPS * COUT_G + oc) * KH * KW + tap, tl.sum(acc, 0), mask=in_oc)


# ------------------------------------------------------------------------------------------------
# Operators


def _check(what, x, weight, groups, stride, padding, dilation, activation, same_dtype):
    """Every argument the kernels index by, as the C++ operator checks them (bmkernels.conv2d has checked
    them with clearer messages): kernels must never read or write outside a tensor, nor divide by 0.
    same_dtype: (name, tensor or None, must have the output's shape) triples of x's dtype and device.
    Returns the output shape (N, C_out, H_out, W_out)."""
    if x.dtype not in DTYPES:
        raise TypeError(
            f"bmkernels conv2d backend 'triton': x must be float16, bfloat16 or float32; got {x.dtype} "
            "(float64 runs on backend='cpu' or 'reference')"
        )
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        raise TypeError(
            "bmkernels conv2d backend 'triton': the Triton interpreter (CPU tensors) cannot compute in "
            f"bfloat16 (it returns garbage); bfloat16 runs on CUDA tensors ({what})"
        )
    for name, values, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(values) != (4 if name == "padding" else 2) or min(values) < least:
            raise ValueError(f"{what}: {name} must be {len(values)} ints >= {least}; got {list(values)}")
    if not 0 <= activation <= _LAST_ACTIVATION:
        raise ValueError(
            f"{what}: activation must be a code 0..{_LAST_ACTIVATION} of bmk::Activation; got {activation!r}"
        )
    if not (
        x.dim() == 4
        and weight.dim() == 4
        and groups > 0
        and weight.shape[0] >= 1
        and weight.shape[0] % groups == 0
        and weight.shape[1] * groups == x.shape[1]
        and min(weight.shape[2:]) >= 1
    ):
        raise ValueError(
            f"{what}: x {tuple(x.shape)} and weight {tuple(weight.shape)} (groups {groups}) do not make a conv2d "
            "(expected 4-D x, weight (C_out >= 1, C_in / groups, kH >= 1, kW >= 1))"
        )
    out_shape = ops_conv.output_shape(x.shape, weight.shape, stride, padding, dilation)
    if min(out_shape[2:]) < 1:
        raise ValueError(f"{what}: the (padded) input {tuple(x.shape)} is smaller than the (dilated) kernel")
    for name, t, out_sized in (("weight", weight, False), *same_dtype):
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"{what}: {name} must have x's dtype {x.dtype} and device {x.device}; got {t.dtype} {t.device}"
            )
        if out_sized and tuple(t.shape) != out_shape:
            raise ValueError(f"{what}: {name} must have the output's shape {out_shape}; got {tuple(t.shape)}")
    return out_shape


def _geometry(x, weight, out_hw, groups):
    """Sizes every kernel takes: (H, W, OH, OW, groups, C_in / groups, C_out / groups, kH, kW)."""
    return (*x.shape[2:], *out_hw, groups, weight.shape[1], weight.shape[0] // groups, *weight.shape[2:])


def _conv_params(stride, padding, dilation):
    """(stride_h, stride_w, pad_top, pad_left, dil_h, dil_w): pad_bottom / pad_right only set the output size."""
    return (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])


def _tap_major(weight):
    """The same (C_out, C_in / groups, kH, kW) weight stored as (kH, kW, C_in / groups, C_out): the kernels'
    weight tiles then read consecutive output channels (a small copy; weights are small)."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _is_depthwise(weight):
    """One input channel per group: the direct kernels (a GEMM over one channel wastes the tensor cores)."""
    return weight.shape[1] == 1


def _channel_grid(pixels, channels, groups, depthwise):
    """Grid over (pixel blocks, channel blocks, groups); the depthwise kernels cover every group at once."""
    if depthwise:
        return lambda meta: (triton.cdiv(pixels, meta["BLOCK_M"]), triton.cdiv(channels * groups, meta["BLOCK_N"]), 1)
    return lambda meta: (triton.cdiv(pixels, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_N"]), groups)


@triton_op("bmkernels::conv2d_triton_fwd", mutates_args={})
def conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: int,
    slope: float,
    save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of torch.ops.bmkernels.conv2d_fwd: (out in x's memory format, pre-activation or empty)."""
    _check(
        "conv2d_fwd",
        x,
        weight,
        groups,
        stride,
        padding,
        dilation,
        activation,
        [("residual", residual, True), ("bias", bias, False)],
    )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv2d_fwd: bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    # the C++ op's output allocation (its fake kernel): out in x's memory format, preact like out or empty
    out, preact = ops_conv._fake_fwd(
        x, weight, bias, residual, stride, padding, dilation, groups, activation, slope, save_preact
    )
    if out.numel() == 0:
        return out, preact
    batch, out_c, out_h, out_w = out.shape
    geometry = _geometry(x, weight, (out_h, out_w), groups)
    pixels = batch * out_h * out_w
    depthwise = _is_depthwise(weight)
    kernel = _depthwise_fwd_kernel if depthwise else _fwd_kernel
    weight = _tap_major(weight)
    wrap_triton(kernel)[_channel_grid(pixels, out_c // groups, groups, depthwise)](
        x,
        weight,
        bias if bias is not None else x,
        residual if residual is not None else x,
        out,
        preact if save_preact else out,
        *x.stride(),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        *out.stride(),
        *geometry[:4],
        pixels,
        *geometry[4:],
        *_conv_params(stride, padding, dilation),
        float(slope),
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        SAVE_PREACT=save_preact,
        ACT=activation,
    )
    return out, preact


@triton_op("bmkernels::conv2d_triton_bwd", mutates_args={})
def conv2d_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    act_saved: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: int,
    slope: float,
    saved_is_output: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of torch.ops.bmkernels.conv2d_bwd: (dx, dweight, dbias, dresidual), each empty unless
    output_mask asks for it."""
    _check(
        "conv2d_bwd",
        x,
        weight,
        groups,
        stride,
        padding,
        dilation,
        activation,
        [("grad_out", grad_out, True), ("act_saved", act_saved if activation else None, True)],
    )
    if not activation:  # not read: any output-shaped tensor fills the kernel's arguments
        act_saved = grad_out
    # every gradient is allocated (dresidual holds dZ, which dx and dweight read); the ones not asked for are dropped
    dx, dw, db, dres = ops_conv._fake_bwd(
        grad_out,
        x,
        weight,
        act_saved,
        stride,
        padding,
        dilation,
        groups,
        activation,
        slope,
        saved_is_output,
        [True] * 4,
    )
    batch, out_c, out_h, out_w = grad_out.shape
    pixels = batch * out_h * out_w
    if pixels == 0 or out_c == 0:  # nothing flows back (no pixels, or x has 0 channels): zero gradients
        for g in (dx, dw, db, dres):
            g.zero_()
    else:
        bias_partial = torch.empty(triton.cdiv(pixels, DZ_BLOCK_P), out_c, dtype=torch.float32, device=x.device)
        wrap_triton(_dz_kernel)[(triton.cdiv(pixels, DZ_BLOCK_P), triton.cdiv(out_c, DZ_BLOCK_C))](
            grad_out,
            act_saved,
            dres,
            bias_partial,
            *grad_out.stride(),
            *act_saved.stride(),
            *dres.stride(),
            pixels,
            out_c,
            out_h,
            out_w,
            float(slope),
            ACT=activation,
            FROM_OUTPUT=saved_is_output,
            BLOCK_P=DZ_BLOCK_P,
            BLOCK_C=DZ_BLOCK_C,
        )
        db = bias_partial.sum(0).to(weight.dtype)
        geometry = _geometry(x, weight, (out_h, out_w), groups)
        sizes = (
            *geometry[:4],
            batch * geometry[0] * geometry[1],
            *geometry[4:],
            *_conv_params(stride, padding, dilation),
        )
        depthwise = _is_depthwise(weight)
        if output_mask[0]:
            weight_t = _tap_major(weight)
            if depthwise:
                kernel, grid = _depthwise_dx_kernel, _channel_grid(sizes[4], 1, groups, True)
            else:  # input pixels grouped by stride residue class (see _dx_kernel)
                classes = stride[0] * stride[1]
                class_pixels = batch * triton.cdiv(sizes[0], stride[0]) * triton.cdiv(sizes[1], stride[1])
                kernel = _dx_kernel
                grid = lambda meta: (
                    triton.cdiv(class_pixels, meta["BLOCK_M"]),
                    triton.cdiv(geometry[5], meta["BLOCK_N"]),
                    groups * classes,
                )
            dx_sizes = sizes if depthwise else (*sizes[:4], class_pixels, *sizes[5:])
            wrap_triton(kernel)[grid](dres, weight_t, dx, *dres.stride(), *weight_t.stride(), *dx.stride(), *dx_sizes)
        if output_mask[1]:
            split = max(1, min(MAX_SPLIT, triton.cdiv(pixels, PIXELS_PER_SPLIT)))
            partial = torch.empty(split, weight.numel(), dtype=torch.float32, device=x.device)
            sizes = (*sizes[:4], pixels, *sizes[5:], triton.cdiv(pixels, split))
            if depthwise:
                kernel = _depthwise_dweight_kernel
                grid = lambda meta: (triton.cdiv(out_c, meta["BLOCK_N"]), weight[0].numel(), split)
            else:
                kernel = _dweight_kernel
                grid = lambda meta: (
                    triton.cdiv(geometry[6], meta["BLOCK_M"]),
                    triton.cdiv(weight[0].numel(), meta["BLOCK_N"]),
                    groups * split,
                )
            wrap_triton(kernel)[grid](dres, x, partial, *dres.stride(), *x.stride(), *sizes)
            # into dw as the fake allocated it (x's memory format), converting the dtype on the way
            dw.copy_(partial.sum(0).view(out_c, *weight.shape[2:], -1).permute(0, 3, 1, 2))
    return tuple(g if wanted else x.new_empty((0,)) for g, wanted in zip((dx, dw, db, dres), output_mask, strict=True))


torch.library.register_autograd(
    "bmkernels::conv2d_triton_fwd",
    ops_conv.backward_with(torch.ops.bmkernels.conv2d_triton_bwd),
    setup_context=ops_conv._setup_context,
)

if INTERPRETED:
    # Fake-tensor tracing of a triton_op runs its body, and the interpreter cannot run a kernel on fake
    # tensors: under the interpreter the ops get the C++ ops' fake kernels (same outputs), so that
    # torch.compile can trace them (tests/triton/test_triton_conv.py). Compiled triton needs none.
    conv2d_fwd.register_fake(ops_conv._fake_fwd)
    conv2d_bwd.register_fake(ops_conv._fake_bwd)
