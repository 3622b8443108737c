"""Triton GRU kernels for bmkernels.gru_cell and bmkernels.gru (forward and backward).

Semantics are those of bmkernels/reference/gru.py and csrc/common/gru_math.h (gate order r, z, n;
b_hn inside the reset product). The operators torch.ops.bmkernels.gru_triton_cell_fwd /
gru_triton_layer_fwd / gru_triton_layer_bwd take exactly the arguments of the C++ gru_cell_fwd /
gru_layer_fwd / gru_layer_bwd and return the same tensors, so bmkernels/ops/gru.py checks arguments
once for both; their autograd is registered here in Python (the C++ ops' is csrc/autograd/gru.cpp).

- forward of a layer: the input projections of every step and direction as one GEMM (torch), b_ih
  and b_hr, b_hz folded in; then the recurrence, whose tile (_fwd_tile: a batch block x unit block)
  runs the recurrent matmul h W_hh^T for the r, z, n rows of its units and applies the gate math to
  the three accumulators before anything leaves registers. The state is float32, double-buffered (a
  step reads one buffer whole, writes its tile of the other; step 0 reads h0, which stays read-only
  so the autotuner may rerun a kernel). Two kernels run that tile:
  - persistent (hidden <= PERSISTENT_MAX_HIDDEN): one program per (batch block, direction) loops
    over every step and every unit block of its rows, a barrier per step. Rows of different batch
    blocks never depend on each other, so no grid-wide barrier is needed (Triton has none that is
    safe without cooperative launch). No launch per step, but parallel over batch blocks only.
  - per step (larger hidden sizes): one launch per time step for both directions, one program per
    (batch block, unit block, direction).
- workspace for backward: the C++ op's layout, (D, T, B, 5H) float32 of r, z, n, hn = W_hn h + b_hn
  and the previous state; nothing is recomputed from x in backward.
- backward of a layer: the same two variants, in reverse time. A tile (_bwd_tile) computes the gate
  gradients of its own units (stored for the weight GEMMs) and, for dh_prev = dh' z + [d_r, d_z,
  d_hn] W_hh, the gate gradients of every unit of its rows block by block, fused into that matmul's
  loop (the cheap elementwise work is redone per unit block instead of a second pass per step).
  Then dx, dW_ih, dW_hh and the bias gradients are GEMMs / sums over all steps (torch).
- a cell step is a one-step, one-direction layer (same kernels).
- lengths: steps t >= lengths[b] keep the state, output 0, zero workspace; backward passes the state
  gradient through them.
- float16, bfloat16, float32: GEMM operands in the input dtype with float32 accumulation (float32 in
  IEEE precision, not TF32), gate math and state in float32. float64 has no Triton path.

Import this module only with triton importable; under TRITON_INTERPRET=1 it must also be imported
after the variable is set (triton decides at decoration time), and uses one small fixed config.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from bmkernels.ops import gru as ops_gru
from bmkernels.ops._common import bind, call_args, tensor_names
from bmkernels.triton.attention import _tanh, tuned

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WORKSPACE_GATES = 5  # r, z, n, hn, h_prev per unit (the C++ op's kWorkspaceGates)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


def _configs(blocks):
    """Autotune configs (batch block, unit block, reduction block, warps) for A100/H100; one small
    fixed config under the interpreter (16 so that hidden sizes above 16 cross tile edges)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_B": b, "BLOCK_H": h, "BLOCK_K": k}, num_warps=w, num_stages=2)
        for b, h, k, w in tuned(blocks)
    ]


# small unit blocks spread one step of a small batch over more SMs; larger ones reuse W better
_STEP_CONFIGS = _configs(
    [
        (16, 16, 64, 2),
        (16, 32, 64, 4),
        (32, 32, 64, 4),
        (16, 64, 64, 4),
        (32, 64, 32, 4),
        (64, 64, 32, 4),
        (64, 128, 32, 8),
        (128, 64, 32, 8),
    ]
)
# persistent kernels: one program per (batch block, direction) loops over all units of every step
_SEQ_CONFIGS = _configs([(16, 32, 64, 4), (16, 64, 64, 4), (32, 32, 64, 4), (32, 64, 32, 4), (64, 64, 32, 8)])
_TUNE_KEY = ["B", "H", "D"]
# Up to this hidden size a layer runs the persistent kernels (no launch per step; parallel over batch
# blocks and directions only), above it one launch per step (parallel over unit blocks too). A guess
# for A100/H100 that was never timed on a GPU: benchmarks/bench_triton_gru.py is there to tune it.
PERSISTENT_MAX_HIDDEN = 256


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_state(First, cur, offsets, mask, s):
    """A tile of the state (or its gradient) entering step s: from First (D, B, H) at step 0, else from
    the float32 double buffer (First stays read-only, so a kernel can be rerun by the autotuner)."""
    first = tl.load(First + offsets, mask=mask & (s == 0), other=0.0).to(tl.float32)
    # .cg (L2, not L1): in the persistent kernels other warps of the program wrote this in the last step
    return first + tl.load(cur + offsets, mask=mask & (s > 0), other=0.0, cache_modifier=".cg")


@triton.jit
def _fwd_tile(
    GI,
    WT,
    Bias,
    Lengths,
    H0,
    State,
    Out,
    WS,
    s,
    d,
    rows,
    cols,
    T,
    B,
    H,
    D,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Step s of direction d (time t = s, or T-1-s backwards) for the (rows x cols) tile. GI (T, B, D*3H):
    input projections with biases folded in; WT (D, H, 3H): W_hh transposed; Bias (D, 3H): b_hh (only
    b_hn is read); H0 (D, B, H); State (D, 2, B, H) float32, read from buffer s % 2 (H0 at s = 0),
    written to the other; Out (T, B, D*H); WS (D, T, B, 5H) float32."""
    t = tl.where(d == 0, s, T - 1 - s)
    in_rows = rows < B
    tile = in_rows[:, None] & (cols[None, :] < H)
    H0 += d * B * H
    cur = State + (d * 2 + s % 2) * B * H
    nxt = State + (d * 2 + (s + 1) % 2) * B * H
    WT += d * H * 3 * H

    acc_r = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    acc_z = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    acc_n = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        h = _load_state(H0, cur, rows[:, None] * H + k[None, :], in_rows[:, None] & (k[None, :] < H), s)
        h = h.to(WT.dtype.element_ty)
        w_mask = (k[:, None] < H) & (cols[None, :] < H)
        w = WT + k[:, None] * 3 * H + cols[None, :]
        acc_r += tl.dot(h, tl.load(w, mask=w_mask, other=0.0), input_precision="ieee")
        acc_z += tl.dot(h, tl.load(w + H, mask=w_mask, other=0.0), input_precision="ieee")
        acc_n += tl.dot(h, tl.load(w + 2 * H, mask=w_mask, other=0.0), input_precision="ieee")

    gi = GI + (t * B + rows[:, None]).to(tl.int64) * D * 3 * H + d * 3 * H + cols[None, :]
    gi_r = tl.load(gi, mask=tile, other=0.0).to(tl.float32)
    gi_z = tl.load(gi + H, mask=tile, other=0.0).to(tl.float32)
    gi_n = tl.load(gi + 2 * H, mask=tile, other=0.0).to(tl.float32)
    hn = acc_n
    if HAS_BIAS:
        hn += tl.load(Bias + d * 3 * H + 2 * H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    h_old = _load_state(H0, cur, rows[:, None] * H + cols[None, :], tile, s)
    # gru_gates_forward of csrc/common/gru_math.h
    r = _sigmoid(gi_r + acc_r)
    z = _sigmoid(gi_z + acc_z)
    n = _tanh(gi_n + r * hn)
    h_new = n + z * (h_old - n)
    out = h_new
    h_saved = h_old
    if HAS_LENGTHS:  # past this sequence's end: state kept, output 0, workspace 0
        valid = (t < tl.load(Lengths + rows, mask=in_rows, other=0))[:, None]
        out = tl.where(valid, h_new, 0.0)
        h_new = tl.where(valid, h_new, h_old)
        r = tl.where(valid, r, 0.0)
        z = tl.where(valid, z, 0.0)
        n = tl.where(valid, n, 0.0)
        hn = tl.where(valid, hn, 0.0)
        h_saved = tl.where(valid, h_old, 0.0)
    tl.store(nxt + rows[:, None] * H + cols[None, :], h_new, mask=tile)
    tl.store(
        Out + (t * B + rows[:, None]).to(tl.int64) * D * H + d * H + cols[None, :],
        out.to(Out.dtype.element_ty),
        mask=tile,
    )
    if SAVE:
        ws = WS + ((d * T + t) * B + rows[:, None]).to(tl.int64) * 5 * H + cols[None, :]
        tl.store(ws, r, mask=tile)
        tl.store(ws + H, z, mask=tile)
        tl.store(ws + 2 * H, n, mask=tile)
        tl.store(ws + 3 * H, hn, mask=tile)
        tl.store(ws + 4 * H, h_saved, mask=tile)


@triton.autotune(configs=_STEP_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _step_fwd_kernel(
    GI,
    WT,
    Bias,
    Lengths,
    H0,
    State,
    Out,
    WS,
    s,
    T,
    B,
    H,
    D,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One step of both directions: program (batch block, unit block, direction)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _fwd_tile(
        GI,
        WT,
        Bias,
        Lengths,
        H0,
        State,
        Out,
        WS,
        s,
        tl.program_id(2),
        rows,
        cols,
        T,
        B,
        H,
        D,
        HAS_BIAS,
        HAS_LENGTHS,
        SAVE,
        BLOCK_B,
        BLOCK_H,
        BLOCK_K,
    )


@triton.autotune(configs=_SEQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _seq_fwd_kernel(
    GI,
    WT,
    Bias,
    Lengths,
    H0,
    State,
    Out,
    WS,
    T,
    B,
    H,
    D,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Persistent over time: program (batch block, direction) runs every step for all units of its
    rows, which depend on nothing outside them; a barrier per step makes the step's state writes
    visible to the whole program before the next step reads them."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    for s in range(0, T):
        for j0 in range(0, H, BLOCK_H):
            _fwd_tile(
                GI,
                WT,
                Bias,
                Lengths,
                H0,
                State,
                Out,
                WS,
                s,
                tl.program_id(2),
                rows,
                j0 + tl.arange(0, BLOCK_H),
                T,
                B,
                H,
                D,
                HAS_BIAS,
                HAS_LENGTHS,
                SAVE,
                BLOCK_B,
                BLOCK_H,
                BLOCK_K,
            )
        tl.debug_barrier()


@triton.jit
def _gate_grads(GradOut, WS, dh_first, dh_cur, rows, units, valid, s, t, d, T, B, H, D):
    """gru_gates_backward of csrc/common/gru_math.h for a (rows x units) tile from the saved
    workspace: (d_r, d_z, d_in, d_hn, d_h_direct), all 0 outside the tile and where not valid."""
    tile = valid & (units[None, :] < H)
    g = _load_state(dh_first, dh_cur, rows[:, None] * H + units[None, :], tile, s)
    g += tl.load(
        GradOut + (t * B + rows[:, None]).to(tl.int64) * D * H + d * H + units[None, :], mask=tile, other=0.0
    ).to(tl.float32)
    ws = WS + ((d * T + t) * B + rows[:, None]).to(tl.int64) * 5 * H + units[None, :]
    r = tl.load(ws, mask=tile, other=0.0)
    z = tl.load(ws + H, mask=tile, other=0.0)
    n = tl.load(ws + 2 * H, mask=tile, other=0.0)
    hn = tl.load(ws + 3 * H, mask=tile, other=0.0)
    h = tl.load(ws + 4 * H, mask=tile, other=0.0)
    d_in = g * (1.0 - z) * (1.0 - n * n)
    d_hn = d_in * r
    d_r = d_in * hn * r * (1.0 - r)
    d_z = g * (h - n) * z * (1.0 - z)
    d_h = g * z
    # g is 0 off the tile, but d_in = g (1 - z)(1 - n^2) is not 0 where the zeroed workspace is read
    return (
        tl.where(tile, d_r, 0.0),
        tl.where(tile, d_z, 0.0),
        tl.where(tile, d_in, 0.0),
        tl.where(tile, d_hn, 0.0),
        d_h,
    )


@triton.jit
def _bwd_tile(
    GradOut,
    WS,
    W,
    Lengths,
    GradHn,
    dState,
    dGI,
    dGH,
    s,
    d,
    rows,
    cols,
    T,
    B,
    H,
    D,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward step s of direction d (time t = T-1-s, or s backwards) for the (rows x cols) tile.
    GradOut (T, B, D*H); WS (D, T, B, 5H) float32; W (D, 3H, H): W_hh; GradHn (D, B, H); dState
    (D, 2, B, H) float32: dL/dh' in buffer s % 2 (GradHn at s = 0), dL/dh written to the other;
    dGI (T, B, D, 3H) = [d_r, d_z, d_in] and dGH (D, T, B, 3H) = [d_r, d_z, d_hn], in the input
    dtype, for the weight GEMMs."""
    t = tl.where(d == 0, T - 1 - s, s)
    in_rows = rows < B
    valid = in_rows[:, None]
    if HAS_LENGTHS:
        valid = valid & (t < tl.load(Lengths + rows, mask=in_rows, other=0))[:, None]
    tile = in_rows[:, None] & (cols[None, :] < H)
    GradHn += d * B * H
    cur = dState + (d * 2 + s % 2) * B * H
    nxt = dState + (d * 2 + (s + 1) % 2) * B * H
    W += d * 3 * H * H

    d_r, d_z, d_in, d_hn, d_h = _gate_grads(GradOut, WS, GradHn, cur, rows, cols, valid, s, t, d, T, B, H, D)
    dgi = dGI + ((t * B + rows[:, None]).to(tl.int64) * D + d) * 3 * H + cols[None, :]
    tl.store(dgi, d_r.to(dGI.dtype.element_ty), mask=tile)
    tl.store(dgi + H, d_z.to(dGI.dtype.element_ty), mask=tile)
    tl.store(dgi + 2 * H, d_in.to(dGI.dtype.element_ty), mask=tile)
    dgh = dGH + ((d * T + t) * B + rows[:, None]).to(tl.int64) * 3 * H + cols[None, :]
    tl.store(dgh, d_r.to(dGH.dtype.element_ty), mask=tile)
    tl.store(dgh + H, d_z.to(dGH.dtype.element_ty), mask=tile)
    tl.store(dgh + 2 * H, d_hn.to(dGH.dtype.element_ty), mask=tile)

    # dL/dh = dh' z + [d_r, d_z, d_hn] W_hh, the gate gradients of every unit recomputed per block
    acc = d_h
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_r, k_z, _, k_hn, _ = _gate_grads(GradOut, WS, GradHn, cur, rows, k, valid, s, t, d, T, B, H, D)
        w_mask = (k[:, None] < H) & (cols[None, :] < H)
        w = W + k[:, None] * H + cols[None, :]
        dt = W.dtype.element_ty
        acc += tl.dot(k_r.to(dt), tl.load(w, mask=w_mask, other=0.0), input_precision="ieee")
        acc += tl.dot(k_z.to(dt), tl.load(w + H * H, mask=w_mask, other=0.0), input_precision="ieee")
        acc += tl.dot(k_hn.to(dt), tl.load(w + 2 * H * H, mask=w_mask, other=0.0), input_precision="ieee")
    if HAS_LENGTHS:  # past the end: the state's gradient passes through
        acc = tl.where(valid, acc, _load_state(GradHn, cur, rows[:, None] * H + cols[None, :], tile, s))
    tl.store(nxt + rows[:, None] * H + cols[None, :], acc, mask=tile)


@triton.autotune(configs=_STEP_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _step_bwd_kernel(
    GradOut,
    WS,
    W,
    Lengths,
    GradHn,
    dState,
    dGI,
    dGH,
    s,
    T,
    B,
    H,
    D,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One backward step of both directions: program (batch block, unit block, direction)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _bwd_tile(
        GradOut,
        WS,
        W,
        Lengths,
        GradHn,
        dState,
        dGI,
        dGH,
        s,
        tl.program_id(2),
        rows,
        cols,
        T,
        B,
        H,
        D,
        HAS_LENGTHS,
        BLOCK_K,
    )


@triton.autotune(configs=_SEQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _seq_bwd_kernel(
    GradOut,
    WS,
    W,
    Lengths,
    GradHn,
    dState,
    dGI,
    dGH,
    T,
    B,
    H,
    D,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Persistent backward over time: program (batch block, direction), as _seq_fwd_kernel."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    for s in range(0, T):
        for j0 in range(0, H, BLOCK_H):
            _bwd_tile(
                GradOut,
                WS,
                W,
                Lengths,
                GradHn,
                dState,
                dGI,
                dGH,
                s,
                tl.program_id(2),
                rows,
                j0 + tl.arange(0, BLOCK_H),
                T,
                B,
                H,
                D,
                HAS_LENGTHS,
                BLOCK_K,
            )
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
# Operators


def _check(x, what):
    if x.dtype not in DTYPES:
        raise TypeError(
            f"bmkernels gru backend 'triton': x must be float16, bfloat16 or float32; got {x.dtype} "
            f"(float64 runs on backend='cpu' or 'reference') ({what})"
        )
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        raise TypeError(
            "bmkernels gru backend 'triton': the Triton interpreter (CPU tensors) cannot compute in "
            "bfloat16 (it returns garbage); bfloat16 runs on CUDA tensors"
        )


def _check_args(what, x, expected):
    """x's dtype, then each (name, tensor or None, shape) of expected: x's dtype and device, that shape.
    The C++ operators' checks (bmkernels.gru has checked with clearer messages): kernels must never read
    or write outside a tensor."""
    _check(x, what)
    for name, t, shape in expected:
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"bmkernels {what}: {name} must have x's dtype {x.dtype} and device {x.device}; "
                f"got {t.dtype} {t.device}"
            )
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"bmkernels {what}: {name} must have shape {tuple(shape)}; got {tuple(t.shape)}")


def _check_layer(what, x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
    """The layer operators' arguments: x (T, B, I), h0 (D, B, H), w_ih (D, 3H, I), w_hh (D, 3H, H), biases (D, 3H),
    lengths int64 (B,) in [0, T]."""
    if x.dim() != 3 or w_hh.dim() != 3 or w_hh.shape[0] not in (1, 2) or w_hh.shape[2] < 1 or x.shape[0] < 1:
        raise ValueError(
            f"bmkernels {what}: expected x (T >= 1, B, I) and w_hh (D = 1 or 2, 3H, H >= 1); got x "
            f"{tuple(x.shape)}, w_hh {tuple(w_hh.shape)}"
        )
    (steps, batch, input_size), directions, hidden = x.shape, w_hh.shape[0], w_hh.shape[2]
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"bmkernels {what}: pass both b_ih and b_hh or neither")
    bias_shape = (directions, 3 * hidden)
    _check_args(
        what,
        x,
        [
            ("h0", h0, (directions, batch, hidden)),
            ("w_ih", w_ih, (directions, 3 * hidden, input_size)),
            ("w_hh", w_hh, (directions, 3 * hidden, hidden)),
            ("b_ih", b_ih, bias_shape),
            ("b_hh", b_hh, bias_shape),
        ],
    )
    if lengths is not None:
        if lengths.dtype != torch.int64 or tuple(lengths.shape) != (batch,):
            raise ValueError(
                f"bmkernels {what}: lengths must be int64 (B,) = ({batch},); got {lengths.dtype} {tuple(lengths.shape)}"
            )
        in_range = torch.compiler.is_compiling() or bool(((lengths >= 0) & (lengths <= steps)).all())
        if batch and not in_range:  # the kernels index steps by them
            raise ValueError(f"bmkernels {what}: lengths must lie in [0, T] = [0, {steps}]; got {lengths.tolist()}")


def _step_grid(batch, hidden, directions):
    return lambda meta: (
        triton.cdiv(batch, meta["BLOCK_B"]),
        triton.cdiv(hidden, meta["BLOCK_H"]),
        directions,
    )


def _seq_grid(batch, directions):
    return lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), 1, directions)


def _input_projection(x, w_ih, b_ih, b_hh):
    """(T, B, D*3H): x W_ih^T of every step and direction in one GEMM, with b_ih and b_hr, b_hz."""
    steps, batch, input_size = x.shape
    w = w_ih.reshape(-1, input_size)
    x2d = x.reshape(steps * batch, input_size)
    if b_ih is None:
        return torch.mm(x2d, w.t()).view(steps, batch, -1)
    hidden = b_ih.shape[1] // 3
    bias = b_ih.clone()
    bias[:, : 2 * hidden] += b_hh[:, : 2 * hidden]
    return torch.addmm(bias.reshape(-1), x2d, w.t()).view(steps, batch, -1)


def _layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save_workspace):
    steps, batch, _ = x.shape
    directions, _, hidden = h0.shape
    out = x.new_empty(steps, batch, directions * hidden)
    ws = x.new_empty(
        (directions, steps, batch, WORKSPACE_GATES * hidden) if save_workspace else (0,), dtype=torch.float32
    )
    state = x.new_empty(directions, 2, batch, hidden, dtype=torch.float32)  # step s reads h0 or state[:, s % 2]
    if batch > 0:
        gi = _input_projection(x, w_ih, b_ih, b_hh)
        w_t = w_hh.transpose(1, 2).contiguous()  # (D, H, 3H): the kernel's W tiles load along units
        bias = b_hh.contiguous() if b_hh is not None else x
        lens = lengths.to(x.device).contiguous() if lengths is not None else x
        args = (gi, w_t, bias, lens, h0.contiguous(), state, out, ws)
        flags = {"HAS_BIAS": b_hh is not None, "HAS_LENGTHS": lengths is not None, "SAVE": save_workspace}
        if hidden <= PERSISTENT_MAX_HIDDEN:
            wrap_triton(_seq_fwd_kernel)[_seq_grid(batch, directions)](*args, steps, batch, hidden, directions, **flags)
        else:
            step_fwd = wrap_triton(_step_fwd_kernel)[_step_grid(batch, hidden, directions)]
            for s in range(steps):
                step_fwd(*args, s, steps, batch, hidden, directions, **flags)
    return out, state[:, steps % 2].to(h0.dtype).contiguous(), ws


@triton_op("bmkernels::gru_triton_layer_fwd", mutates_args={})
def gru_layer_fwd(
    x: torch.Tensor,
    h0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    lengths: torch.Tensor | None,
    save_workspace: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of torch.ops.bmkernels.gru_layer_fwd: (out (T, B, D*H), h_n (D, B, H), workspace
    (D, T, B, 5H) float32, empty unless save_workspace)."""
    _check_layer("gru_layer_fwd", x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    return _layer_forward(x.contiguous(), h0, w_ih, w_hh.contiguous(), b_ih, b_hh, lengths, save_workspace)


@triton_op("bmkernels::gru_triton_cell_fwd", mutates_args={})
def gru_cell_fwd(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    save_workspace: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of torch.ops.bmkernels.gru_cell_fwd: (h_next (B, H), workspace (B, 5H) float32,
    (0, 5H) unless save_workspace); a one-step, one-direction layer."""
    if x.dim() != 2 or w_hh.dim() != 2 or w_hh.shape[0] != 3 * w_hh.shape[1] or w_hh.shape[1] < 1:
        raise ValueError(
            f"bmkernels gru_cell_fwd: expected x (B, I) and w_hh (3H, H >= 1); got x {tuple(x.shape)}, "
            f"w_hh {tuple(w_hh.shape)}"
        )
    if (b_ih is None) != (b_hh is None):
        raise ValueError("bmkernels gru_cell_fwd: pass both b_ih and b_hh or neither")
    (batch, input_size), hidden = x.shape, w_hh.shape[1]
    _check_args(
        "gru_cell_fwd",
        x,
        [
            ("h", h, (batch, hidden)),
            ("w_ih", w_ih, (3 * hidden, input_size)),
            ("b_ih", b_ih, (3 * hidden,)),
            ("b_hh", b_hh, (3 * hidden,)),
        ],
    )
    out, _, ws = _layer_forward(
        x.unsqueeze(0).contiguous(),
        h.unsqueeze(0),
        w_ih.unsqueeze(0),
        w_hh.unsqueeze(0).contiguous(),
        None if b_ih is None else b_ih.unsqueeze(0),
        None if b_hh is None else b_hh.unsqueeze(0),
        None,
        save_workspace,
    )
    return out[0], ws.view(batch if save_workspace else 0, WORKSPACE_GATES * hidden)


@triton_op("bmkernels::gru_triton_layer_bwd", mutates_args={})
def gru_layer_bwd(
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    workspace: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of torch.ops.bmkernels.gru_layer_bwd: (dx, dh0, dw_ih, dw_hh, db_ih, db_hh), the
    bias gradients (D, 3H) when has_bias, else empty."""
    _check_layer("gru_layer_bwd", x, h0, w_ih, w_hh, None, None, lengths)
    steps, batch, input_size = x.shape
    directions, _, hidden = h0.shape
    _check_args(
        "gru_layer_bwd",
        x,
        [
            ("grad_out", grad_out, (steps, batch, directions * hidden)),
            ("grad_h_n", grad_h_n, (directions, batch, hidden)),
        ],
    )
    ws_shape = (directions, steps, batch, WORKSPACE_GATES * hidden)
    if workspace.dtype != torch.float32 or workspace.shape != ws_shape:
        raise ValueError(
            f"bmkernels gru_layer_bwd: workspace must be the forward's float32 (D, T, B, 5H) = {ws_shape}; "
            f"got {tuple(workspace.shape)} {workspace.dtype}"
        )
    workspace = workspace.contiguous()
    dtype = x.dtype
    dgi = x.new_empty(steps, batch, directions, 3 * hidden)  # every element is written by the kernel
    dgh = x.new_empty(directions, steps, batch, 3 * hidden)
    dstate = x.new_empty(directions, 2, batch, hidden, dtype=torch.float32)  # step s reads grad_h_n or dstate[:, s % 2]
    if batch > 0:
        lens = lengths.to(x.device).contiguous() if lengths is not None else x
        args = (grad_out.contiguous(), workspace, w_hh.contiguous(), lens, grad_h_n.contiguous(), dstate, dgi, dgh)
        if hidden <= PERSISTENT_MAX_HIDDEN:
            wrap_triton(_seq_bwd_kernel)[_seq_grid(batch, directions)](
                *args, steps, batch, hidden, directions, HAS_LENGTHS=lengths is not None
            )
        else:
            step_bwd = wrap_triton(_step_bwd_kernel)[_step_grid(batch, hidden, directions)]
            for s in range(steps):
                step_bwd(*args, s, steps, batch, hidden, directions, HAS_LENGTHS=lengths is not None)
    dgi2 = dgi.view(steps * batch, directions * 3 * hidden)
    dx = torch.mm(dgi2, w_ih.reshape(directions * 3 * hidden, input_size)).view(steps, batch, input_size)
    dw_ih = torch.mm(dgi2.t(), x.reshape(steps * batch, input_size)).view(directions, 3 * hidden, input_size)
    h_prev = workspace.view(directions, steps * batch, WORKSPACE_GATES * hidden)[:, :, 4 * hidden :].to(dtype)
    dw_hh = torch.bmm(dgh.view(directions, steps * batch, 3 * hidden).transpose(1, 2), h_prev)
    if has_bias:
        db_ih = dgi.view(steps * batch, directions, 3 * hidden).sum(0)
        db_hh = dgh.view(directions, steps * batch, 3 * hidden).sum(1)
    else:
        db_ih, db_hh = x.new_empty(0), x.new_empty(0)
    return dx, dstate[:, steps % 2].to(h0.dtype).contiguous(), dw_ih, dw_hh, db_ih, db_hh


# ------------------------------------------------------------------------------------------------
# Autograd (the C++ ops' equivalent is csrc/autograd/gru.cpp)


def _require_workspace(saved):
    if not saved:
        raise RuntimeError(
            "bmkernels gru: backward needs the forward's workspace, which was not saved (the forward "
            "ran with save_workspace=False)"
        )


# the forward's arguments that gru_layer_bwd takes again (x, h0, w_ih, w_hh, lengths), by the tables
_LAYER_SAVED = tuple(n for n in tensor_names(ops_gru.GRU_LAYER_BWD) if n in {a.name for a in ops_gru.GRU_LAYER_FWD})


def _setup_layer(ctx, inputs, output):
    a = bind(ops_gru.GRU_LAYER_FWD, inputs)
    ctx.save_for_backward(*(a[n] for n in _LAYER_SAVED), output[2])
    ctx.has_bias = a["b_ih"] is not None


def _layer_backward(ctx, grad_out, grad_h_n, _):
    values = dict(zip((*_LAYER_SAVED, "workspace"), ctx.saved_tensors, strict=True))
    _require_workspace(values["workspace"].dim() == 4)  # (D, T, B, 5H) when saved, (0,) when not
    values.update(grad_out=grad_out, grad_h_n=grad_h_n, has_bias=ctx.has_bias)
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.bmkernels.gru_triton_layer_bwd(
        *call_args(ops_gru.GRU_LAYER_BWD, values)
    )
    bias_grads = (db_ih, db_hh) if ctx.has_bias else (None, None)
    return dx, dh0, dw_ih, dw_hh, *bias_grads, *([None] * (len(ops_gru.GRU_LAYER_FWD) - 6))


def _setup_cell(ctx, inputs, output):
    x, h, w_ih, w_hh, b_ih, _, _ = inputs
    ctx.save_for_backward(x, h, w_ih, w_hh, output[1])
    ctx.has_bias = b_ih is not None


def _cell_backward(ctx, grad_h_next, _):
    x, h, w_ih, w_hh, workspace = ctx.saved_tensors
    _require_workspace(workspace.shape[0] == h.shape[0])  # (B, 5H) when saved, (0, 5H) when not
    batch, hidden = h.shape
    grads = torch.ops.bmkernels.gru_triton_layer_bwd(
        grad_h_next.unsqueeze(0),
        torch.zeros_like(h).unsqueeze(0),
        x.unsqueeze(0),
        h.unsqueeze(0),
        w_ih.unsqueeze(0),
        w_hh.unsqueeze(0),
        None,
        workspace.view(1, 1, batch, WORKSPACE_GATES * hidden),
        ctx.has_bias,
    )
    dx, dh, dw_ih, dw_hh, db_ih, db_hh = grads
    bias_grads = (db_ih[0], db_hh[0]) if ctx.has_bias else (None, None)
    return dx[0], dh[0], dw_ih[0], dw_hh[0], *bias_grads, None


torch.library.register_autograd("bmkernels::gru_triton_layer_fwd", _layer_backward, setup_context=_setup_layer)
torch.library.register_autograd("bmkernels::gru_triton_cell_fwd", _cell_backward, setup_context=_setup_cell)

if INTERPRETED:
    # Fake-tensor tracing of a triton_op runs its body, and the interpreter cannot run a kernel on fake
    # tensors: under the interpreter the ops get the C++ ops' fake kernels (same outputs), so that
    # torch.compile can trace them (tests/triton/test_triton_gru.py). Compiled triton needs none.
    gru_layer_fwd.register_fake(ops_gru._fake_layer_fwd)
    gru_cell_fwd.register_fake(ops_gru._fake_cell_fwd)
    gru_layer_bwd.register_fake(ops_gru._fake_layer_bwd)
