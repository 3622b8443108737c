"""The CUDA C++ kernels: the architecture layer's probe against the PTX ISA's fragment tables, the
emulator's race detector, the launch planning, and attention against the float64 reference, run by
the SIMT emulator on CPU tensors (backend "cuda_emulated", builds with BMK_CUDA_EMULATOR=1) and, on a
machine with a GPU and a CUDA build, by the GPU (backend "cuda", the same tests: .ci/gpu_check).
Marked `emulator`; tiny shapes only (the emulator runs one fiber per CUDA thread)."""

import pytest
import torch

import bmkernels
from bmkernels import _extension
from bmkernels.reference import attention as reference
from bmkernels.testing import check_against_reference, make_qkv
from tests.ops.test_attention import FEATURES, LK, LQ, B, H, _fwd_args, kernel_fn, reference_fn

EMULATED = "attention" in _extension.emulated_kernels()
needs_emulator = pytest.mark.skipif(not EMULATED, reason="built without BMK_CUDA_EMULATOR=1")
ON_GPU = torch.cuda.is_available() and "attention" in _extension.cuda_kernels()
# where the CUDA kernels run: the emulator, and the GPU when there is one
RUNNERS = [
    pytest.param("cuda_emulated", marks=needs_emulator),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="no CUDA build")]),
]
PROBE_DEVICES = [
    pytest.param("cpu", marks=needs_emulator),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="no CUDA build")]),
]


def kernel(backend, **options):
    """bmkernels.attention on `backend` as a function of CPU tensors (moved to the GPU and back for "cuda")."""
    fn = kernel_fn(backend=backend, **options)
    if backend == "cuda_emulated":
        return fn

    def on_gpu(q, k, v, **tensors):
        moved = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in tensors.items()}
        result = fn(q.cuda(), k.cuda(), v.cuda(), **moved)
        return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()

    return on_gpu


LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, *LOW)

# ------------------------------------------------------------------------------------------------
# The architecture layer: per-lane registers of the probe kernel (csrc/cuda/arch_probe.cu), rebuilt
# here from the PTX ISA's tables (g = lane / 4, t = lane % 4).


def _pairs(values):
    """b16 bit patterns (int tensor, even length) -> the 32-bit words holding consecutive pairs, low first."""
    v = values.to(torch.int64) & 0xFFFF
    return (v[0::2] | (v[1::2] << 16)).tolist()


def _probe_expected(tile_bits, dtype):
    z = tile_bits.clone().reshape(32, 8)
    z[3::4, 4:] = 0  # every fourth lane's cp.async copied 8 of its 16 bytes and zero-filled the rest
    z = z.reshape(16, 16)
    # matrix m of ldmatrix: 8 rows at the addresses of lanes 8m..8m+7 (lane l -> row l % 16, col 8 (l // 16))
    mats = [z[8 * (m % 2) : 8 * (m % 2) + 8, 8 * (m // 2) : 8 * (m // 2) + 8] for m in range(4)]
    a = z.view(dtype).double()
    bmat = torch.stack([torch.cat([mats[0][n], mats[1][n]]) for n in range(8)], 1).view(dtype).double()  # B (16, 8)
    c = torch.arange(128, dtype=torch.float64).reshape(32, 4)
    d = torch.zeros(16, 8, dtype=torch.float64)
    rows = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(4):
            d[g + 8 * (e // 2), 2 * t + e % 2] = c[lane, e]
    d = a @ bmat + d
    for lane in range(32):
        g, t = lane // 4, lane % 4
        plain = [_pairs(m[g, 2 * t : 2 * t + 2])[0] for m in mats]
        trans = [_pairs(m[2 * t : 2 * t + 2, g])[0] for m in mats]
        mma = [d[g + 8 * (e // 2), 2 * t + e % 2].item() for e in range(4)]
        rows.append((plain, trans, mma, float(lane ^ 5), _pairs(z.reshape(32, 8)[lane])))
    return rows


@pytest.mark.parametrize("device", PROBE_DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_arch_probe_matches_ptx_tables(dtype, device):
    # small integers: every product and sum is exact in f32, so D must match exactly
    tile = torch.randint(-8, 9, (16, 16), generator=torch.Generator().manual_seed(0)).to(dtype)
    bits = tile.view(torch.int16)
    got = torch.ops.bmkernels.arch_probe(tile.to(device), dtype == torch.bfloat16).cpu()
    words = got.to(torch.int64) & 0xFFFFFFFF
    as_float = got.view(torch.float32)
    for lane, (plain, trans, mma, shuffled, copied) in enumerate(_probe_expected(bits, dtype)):
        assert words[lane, 0:4].tolist() == plain, f"ldmatrix.x4 lane {lane}"
        assert words[lane, 4:8].tolist() == trans, f"ldmatrix.x4.trans lane {lane}"
        assert words[lane, 8:10].tolist() == plain[:2], f"ldmatrix.x2 lane {lane}"
        assert words[lane, 10].item() == plain[0], f"ldmatrix.x1 lane {lane}"
        assert as_float[lane, 11:15].tolist() == mma, f"mma lane {lane}"
        assert as_float[lane, 15].item() == shuffled, f"shfl_xor lane {lane}"
        assert words[lane, 16:20].tolist() == copied, f"cp.async lane {lane}"


@pytest.mark.parametrize("device", PROBE_DEVICES)
def test_arch_probe_mma_rounds_like_a_matmul(device):
    """Random f16 values: the emulated mma against a float64 matmul of the same operands."""
    tile = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)).half()
    got = torch.ops.bmkernels.arch_probe(tile.to(device), False).cpu().view(torch.float32)[:, 11:15]
    rows = _probe_expected(tile.view(torch.int16), torch.float16)
    want = torch.tensor([r[2] for r in rows])
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("device", PROBE_DEVICES)
@pytest.mark.parametrize("variant", [0, 3], ids=["block_barriers", "warp_sync"])
def test_race_detector_silent_on_correct_kernels(variant, device):
    out = torch.ops.bmkernels.arch_race_demo(torch.empty(0, device=device), variant).cpu()
    tid = torch.arange(64)
    neighbour = (tid // 32) * 32 + (tid + 1) % 32 if variant == 3 else (tid + 1) % 64
    assert torch.equal(out, torch.stack([neighbour * 10, neighbour * 10 + 1]).int())


@needs_emulator
@pytest.mark.parametrize(
    "variant", [1, 2, 4], ids=["missing_barrier_before_read", "missing_barrier_after_read", "missing_syncwarp"]
)
def test_race_detector_catches_missing_barriers(variant):
    with pytest.raises(RuntimeError, match="shared-memory race"):
        torch.ops.bmkernels.arch_race_demo(torch.empty(0), variant)


# ------------------------------------------------------------------------------------------------
# Launch planning (csrc/cuda/plan.h), plain C++ run on the CPU.

SHARED_LIMITS = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
PLAN_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _plan(dtype, d, dv, lq, lk, batch=2, heads=3, limit=SHARED_LIMITS["sm_80"], aligned=True):
    return torch.ops.bmkernels.attention_cuda_plan(PLAN_DTYPES[dtype], d, dv, lq, lk, batch, heads, limit, aligned)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plans_for_every_head_dim_and_length(dtype):
    for d in range(1, 257):
        for dv in {d, max(1, 257 - d)}:
            for lq in (0, 1, 17, 64, 65, 1000):
                bucket, block_n, threads, gx, gy, gz, shared, vector = _plan(dtype, d, dv, lq, 33)
                assert bucket in (64, 128, 256) and max(d, dv) <= bucket and (bucket == 64 or max(d, dv) > bucket // 2)
                assert block_n in (32, 64) and threads == 128
                assert (gx, gy, gz) == (-(-lq // 64), 3, 2)
                assert shared <= SHARED_LIMITS["sm_80"]
                chunk = 16 // (2 if dtype in LOW else 4)
                assert vector == (d % chunk == 0 and dv % chunk == 0)


def test_plan_errors():
    with pytest.raises(RuntimeError, match=r"head dims must be in \[1, 256\]"):
        _plan(torch.float16, 257, 64, 1, 1)
    with pytest.raises(RuntimeError, match="needs 141312 bytes of shared memory"):
        _plan(torch.float32, 256, 256, 1, 1, limit=99 * 1024)
    with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
        _plan(torch.float16, 64, 64, 2**40, 1)  # 2^34 query blocks
    with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
        _plan(torch.float16, 64, 64, 1, 1, batch=70000)
    assert _plan(torch.float16, 64, 64, 1, 1, aligned=False)[7] == 0


# ------------------------------------------------------------------------------------------------
# Attention in the emulator, every feature, forward and every gradient, against the float64 reference.


def _inputs(case, dtype):
    shape, options, extra = FEATURES[case]
    sizes = {"batch": B, "q_heads": H, "q_len": LQ, "k_len": LK, "head_dim": 16, **shape}
    q, k, v = make_qkv(**sizes, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v}
    if extra is not None:
        inputs.update(extra(dtype))
    return inputs, options


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FEATURES)
def test_feature_matches_reference(backend, case, dtype):
    inputs, options = _inputs(case, dtype)
    check_against_reference(
        kernel(backend, return_lse=True, **options),
        reference_fn(return_lse=True, **options),
        inputs,
        dtype,
    )


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "gqa", "softcap", "bias_full_grad"])
def test_gradient_through_lse(backend, case, dtype):
    inputs, options = _inputs(case, dtype)
    check_against_reference(
        kernel(backend, return_lse=True, **options),
        reference_fn(return_lse=True, **options),
        inputs,
        dtype,
        lse_grad=True,
    )


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "head_dim,v_head_dim,q_len,k_len",
    [
        (1, 1, 1, 1),
        (8, 24, 65, 3),
        (20, 36, 5, 70),
        (64, 64, 3, 9),
        (100, 72, 2, 5),
        (256, 256, 2, 3),
        (200, 56, 1, 40),
    ],
)
def test_head_dims_and_lengths(backend, dtype, head_dim, v_head_dim, q_len, k_len):
    q, k, v = make_qkv(
        batch=1,
        q_heads=2,
        kv_heads=1,
        q_len=q_len,
        k_len=k_len,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        dtype=dtype,
    )
    check_against_reference(
        kernel(backend, return_lse=True, causal=True, causal_alignment="bottom_right"),
        reference_fn(return_lse=True, causal=True, causal_alignment="bottom_right"),
        {"q": q, "k": k, "v": v},
        dtype,
    )


def _long_case(name, q_len, k_len, dtype):
    """Options and extra tensors of a feature at lengths that span several key and query blocks."""
    gen = torch.Generator().manual_seed(4)
    if name == "bias":
        return {}, {"bias": torch.randn(q_len, k_len, generator=gen).to(dtype).requires_grad_()}
    if name == "mask":
        return {}, {"mask": torch.rand(2, 1, q_len, k_len, generator=gen) < 0.6}
    options = {
        "plain": {},
        "causal": {"causal": True},
        "causal_bottom_right": {"causal": True, "causal_alignment": "bottom_right"},
        "window": {"window": (20, 9)},
        "softcap_alibi": {"softcap": 2.0},
    }[name]
    extra = {"alibi_slopes": torch.rand(2, generator=gen)} if name == "softcap_alibi" else {}
    return options, extra


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "feature", ["plain", "causal", "causal_bottom_right", "window", "softcap_alibi", "bias", "mask"]
)
@pytest.mark.slow
def test_several_blocks(backend, dtype, feature):
    """70 queries x 150 keys: two query blocks and three key blocks in the forward (the online softmax's
    rescaling, the key-block loop and its barriers), several blocks in both backward kernels."""
    q, k, v = make_qkv(batch=2, q_heads=2, kv_heads=1, q_len=70, k_len=150, head_dim=24, dtype=dtype)
    options, extra = _long_case(feature, 70, 150, dtype)
    check_against_reference(
        kernel(backend, return_lse=True, **options),
        reference_fn(return_lse=True, **options),
        {"q": q, "k": k, "v": v, **extra},
        dtype,
    )


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous(backend, dtype, layout):
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=9, k_len=12, head_dim=16, dtype=dtype, layout=layout)
    inputs = {"q": q, "k": k, "v": v}
    out = check_against_reference(kernel(backend), reference_fn(), inputs, dtype)[0]
    if layout == "transposed":  # out takes q's projection layout, as the CPU kernel's
        assert out.stride(1) < out.stride(2)


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(backend, dtype):
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=5, k_len=7, head_dim=16, dtype=dtype)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1] = False
    inputs = {"q": q, "k": k, "v": v, "mask": mask}
    grads = check_against_reference(kernel(backend), reference_fn(), inputs, dtype)[2]
    assert not grads["q"][:, :, 1].any()
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = kernel(backend, return_lse=True)(q, k, v, mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.isneginf(lse[:, :, 1]).all() and torch.isfinite(lse[:, :, [0, 2, 3, 4]]).all()
    out, lse = kernel(backend, return_lse=True)(q, k, v, key_range=torch.zeros(1, 2, dtype=torch.int64))
    assert not out.any() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [{}, {"causal": True, "window": (4, 2)}], ids=["plain", "causal_window"])
def test_dropout_uses_the_cpu_mask(backend, dtype, options):
    """The keep-mask is the CPU kernel's for the seed drawn (on the GPU: from the device's generator)."""
    q, k, v = make_qkv(batch=B, q_heads=H, q_len=LQ, k_len=LK, head_dim=16, dtype=dtype)
    torch.manual_seed(7)
    device = "cpu" if backend == "cuda_emulated" else "cuda"
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device).cpu()
    keep = bmkernels.dropout_keep_mask(seed, B, H, LQ, LK, 0.3)

    def kern(q, k, v):
        torch.manual_seed(7)
        return kernel(backend, dropout_p=0.3, **options)(q, k, v)

    def ref(q, k, v):
        return reference.attention(q, k, v, dropout_p=0.3, dropout_mask=keep, **options)

    check_against_reference(kern, ref, {"q": q, "k": k, "v": v}, dtype)


@needs_emulator
def test_forward_refuses_what_it_does_not_support():
    q, k, v = make_qkv(batch=1, q_heads=1, q_len=3, head_dim=16, dtype=torch.float64, requires_grad=False)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32; got Double"):
        bmkernels.attention(q, k, v, backend="cuda_emulated")
    q, k, v = make_qkv(batch=1, q_heads=1, q_len=3, head_dim=260, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"head dims must be in \[1, 256\]"):
        bmkernels.attention(q, k, v, backend="cuda_emulated")
    q, k, v = make_qkv(batch=1, q_heads=1, q_len=3, head_dim=16, requires_grad=False)
    segments = torch.tensor([[0, 0], [3, 3]])
    with pytest.raises(RuntimeError, match="segments"):
        args = (None, None, None, None, 1.0, 0.0, -1, -1, 0, 0.0, None, segments)
        torch.ops.bmkernels.attention_emulated_fwd(q, k, v, *args)


@needs_emulator
@pytest.mark.parametrize("optional", (False, True), ids=("no_optional", "all_optional"))
def test_opcheck_emulated_ops(optional):
    """Schema, fake kernel, autograd registration of the emulated operators (torch.compile traces them)."""
    torch.library.opcheck(torch.ops.bmkernels.attention_emulated_fwd.default, _fwd_args(optional))


@pytest.mark.parametrize("backend", RUNNERS)
def test_backward_is_deterministic(backend):
    """No atomics: two runs give bit-identical gradients (GQA, bias gradient, dropout)."""
    q, k, v = make_qkv(batch=1, q_heads=4, kv_heads=1, q_len=40, k_len=70, head_dim=16, dtype=torch.float16)
    bias = torch.randn(40, 70).half().requires_grad_()
    grads = []
    for _ in range(2):
        torch.manual_seed(3)
        out = kernel(backend, dropout_p=0.2, causal=True)(q, k, v, bias=bias)
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v, bias)))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
