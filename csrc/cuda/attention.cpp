// Torch glue of the CUDA attention kernels: argument checks, outputs, parameters, launch. Compiled
// twice: for CUDA tensors (TORCH_LIBRARY_IMPL(bmkernels, CUDA): device guard, current stream, caching
// allocator, no host sync) and, with BMK_CUDA_EMULATOR, for CPU tensors as the operators
// attention_emulated_* that run the same kernel sources in the SIMT emulator (backend "cuda_emulated").
#include "cuda/attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/attention_math.h"
#include "common/attention_params.h"
#include "cuda/torch_launch.h"

namespace bmk::BMK_CUDA_NS {
namespace {

#if defined(BMK_CUDA_EMULATOR)
constexpr const char* kWhat = "bmkernels attention (CUDA kernel, emulated)";
constexpr size_t kSharedLimit = 227 * 1024;  // sm_90's opt-in limit: the emulator checks the largest plan
#else
constexpr const char* kWhat = "bmkernels attention (CUDA kernel)";
#endif

CudaDtype dtype_code(at::ScalarType t) { return BMK_CUDA_NS::dtype_code(t, kWhat, "q"); }

// rows of the last dim contiguous; a copy where not
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool aligned16(const at::Tensor& t) {
  const int64_t chunk = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % chunk) return false;
  return true;
}

void strides_of(const at::Tensor& t, int64_t (&out)[4]) {
  for (int d = 0; d < 4; ++d) out[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

void check_on_device(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(on_device(t) && t.device() == q.device(), kWhat, ": ", name, " must be on q's device ", q.device(),
              "; got ", t.device());
}

// The forward's arguments checked and turned into kernel parameters; the tensors they point into kept alive.
struct Prepared {
  AttentionFwdParams p{};
  CudaDtype dtype;
  at::Tensor q, k, v, bias, mask, alibi, ranges, seed;
};

// Checks the arguments the forward and backward share and fills the launch parameters from them (Args:
// AttentionFwdArgs or AttentionBwdArgs).
template <typename Args>
Prepared prepare(const Args& args) {
  const at::Tensor &q_in = args.q, &k_in = args.k, &v_in = args.v;
  const std::optional<at::Tensor>&bias = args.bias, &mask = args.mask, &alibi_slopes = args.alibi_slopes;
  const std::optional<at::Tensor>&rng_seed = args.rng_seed, &key_range = args.key_range, &segments = args.segments;
  const double scale = args.scale, softcap = args.softcap, dropout_p = args.dropout_p;
  const int64_t window_left = args.window_left, window_right = args.window_right, diag_offset = args.diag_offset;
  TORCH_CHECK(!segments, kWhat,
              ": packed sequences (segments) are not supported by the CUDA kernel yet; use "
              "backend='triton' or pad the batch");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, kWhat,
              ": q, k, v must be 4-D (B, H, L, D); got q ", q_in.sizes(), ", k ", k_in.sizes(), ", v ", v_in.sizes());
  TORCH_CHECK(on_device(q_in), kWhat, ": q must be a ", kDeviceName, " tensor; got ", q_in.device());
  check_on_device("k", k_in, q_in);
  check_on_device("v", v_in, q_in);
  Prepared r;
  r.dtype = dtype_code(q_in.scalar_type());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), kWhat,
              ": q, k, v must share a dtype; got ", q_in.scalar_type(), ", ", k_in.scalar_type(), ", ",
              v_in.scalar_type());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Lk = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B && v_in.size(1) == Hkv && v_in.size(2) == Lk && k_in.size(3) == D,
              kWhat, ": shapes must be q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); got q ", q_in.sizes(),
              ", k ", k_in.sizes(), ", v ", v_in.sizes());
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, kWhat, ": q heads (", Hq, ") must be a multiple of k/v heads (", Hkv,
              ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kWhat, ": dropout_p must be in [0, 1); got ", dropout_p);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, kWhat, ": window bounds must be >= -1; got (", window_left, ", ",
              window_right, ")");
  r.q = rows_contiguous(q_in), r.k = rows_contiguous(k_in), r.v = rows_contiguous(v_in);
  AttentionFwdParams& p = r.p;
  p.q = r.q.const_data_ptr(), p.k = r.k.const_data_ptr(), p.v = r.v.const_data_ptr();
  strides_of(r.q, p.q_stride), strides_of(r.k, p.k_stride), strides_of(r.v, p.v_stride);
  const std::vector<int64_t> grid{B, Hq, Lq, Lk};
  if (bias) {
    check_on_device("bias", *bias, q_in);
    TORCH_CHECK(bias->scalar_type() == q_in.scalar_type(), kWhat, ": bias must have q's dtype ", q_in.scalar_type(),
                "; got ", bias->scalar_type());
    r.bias = bias->expand(grid);
    p.bias = r.bias.const_data_ptr();
    for (int d = 0; d < 4; ++d) p.bias_stride[d] = r.bias.stride(d);
  }
  if (mask) {
    check_on_device("mask", *mask, q_in);
    TORCH_CHECK(mask->scalar_type() == at::kBool, kWhat, ": mask must be bool; got ", mask->scalar_type());
    r.mask = mask->expand(grid);
    p.mask = r.mask.const_data_ptr<bool>();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = r.mask.stride(d);
  }
  if (alibi_slopes) {
    check_on_device("alibi_slopes", *alibi_slopes, q_in);
    TORCH_CHECK(alibi_slopes->is_floating_point() && (alibi_slopes->dim() == 1 || alibi_slopes->dim() == 2), kWhat,
                ": alibi_slopes must be floating (Hq,) or (B, Hq); got ", alibi_slopes->sizes());
    r.alibi = alibi_slopes->to(at::kFloat).expand({B, Hq}).contiguous();
    p.alibi = r.alibi.const_data_ptr<float>();
  }
  if (key_range) {
    check_on_device("key_range", *key_range, q_in);
    TORCH_CHECK(key_range->scalar_type() == at::kLong && key_range->dim() == 2 && key_range->size(0) == B &&
                    key_range->size(1) == 2,
                kWhat, ": key_range must be int64 (B, 2) = (", B, ", 2); got ", key_range->scalar_type(), " ",
                key_range->sizes());
    r.ranges = key_range->contiguous();
    p.key_range = r.ranges.const_data_ptr<int64_t>();
  }
  if (dropout_p > 0) {
    TORCH_CHECK(rng_seed && rng_seed->scalar_type() == at::kLong && rng_seed->numel() >= 1, kWhat,
                ": dropout needs rng_seed, an int64 tensor with one element");
    r.seed = rng_seed->to(q_in.device()).contiguous();  // read by the kernel: no host sync, graph-capturable
    p.seed = r.seed.const_data_ptr<int64_t>();
  }
  const AttentionWindow win = saturated_window(window_left, window_right, diag_offset, Lq, Lk);
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hkv, p.q_len = Lq, p.k_len = Lk, p.head_dim = D, p.v_head_dim = Dv;
  p.window_left = win.left, p.window_right = win.right, p.diag_offset = win.diag_offset;
  p.scale = static_cast<float>(scale), p.softcap = static_cast<float>(softcap);
  p.dropout_p = static_cast<float>(dropout_p);
  return r;
}

size_t shared_limit() {
#if defined(BMK_CUDA_EMULATOR)
  return kSharedLimit;
#else
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
#endif
}

AttentionFwdResult attention_fwd(const AttentionFwdArgs& args) {
  const at::Tensor& q = args.q;
  TORCH_CHECK(!args.sinks, kWhat, ": sinks are not supported on the CUDA kernel");
  TORCH_CHECK(on_device(q), kWhat, ": q must be a ", kDeviceName, " tensor; got ", q.device());
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  Prepared r = prepare(args);
  AttentionFwdParams& p = r.p;
  // out laid out as q is (as the CPU kernel's): (B, Lq, Hq, Dv) storage for the projection layout
  at::Tensor out = r.q.stride(1) < r.q.stride(2)
                       ? at::empty({p.batch, p.q_len, p.q_heads, p.v_head_dim}, r.q.options()).transpose(1, 2)
                       : at::empty({p.batch, p.q_heads, p.q_len, p.v_head_dim}, r.q.options());
  at::Tensor lse = at::empty({p.batch, p.q_heads, p.q_len}, r.q.options().dtype(at::kFloat));
  std::string error;
  const AttentionFwdPlan plan =
      plan_attention_fwd(r.dtype, p.head_dim, p.v_head_dim, p.q_len, p.k_len, p.batch, p.q_heads, shared_limit(),
                         aligned16(r.q) && aligned16(r.k) && aligned16(r.v), error);
  TORCH_CHECK(error.empty(), kWhat, ": ", error);
  if (plan.empty()) return {out, lse};
  p.out = out.mutable_data_ptr(), p.lse = lse.mutable_data_ptr<float>();
  strides_of(out, p.out_stride);
  run_launch(kWhat, [&](Stream s) { return launch_attention_fwd(p, plan, s); });
  return {out, lse};
}

AttentionBwdResult attention_bwd(const AttentionBwdArgs& args) {
  const auto& [grad_out, q, k, v, out, lse, grad_lse, bias, mask, alibi_slopes, rng_seed, scale, softcap, window_left,
               window_right, diag_offset, dropout_p, bias_grad, key_range, segments] = args;
  TORCH_CHECK(on_device(q), kWhat, ": q must be a ", kDeviceName, " tensor; got ", q.device());
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  Prepared r = prepare(args);
  const AttentionFwdParams& p = r.p;
  const int64_t B = p.batch, Hq = p.q_heads, Lq = p.q_len;
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == B && out.size(1) == Hq &&
                  out.size(2) == Lq && out.size(3) == p.v_head_dim,
              kWhat, ": grad_out and out must be (B, Hq, Lq, Dv); got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, Hq, Lq}), kWhat, ": lse must be (B, Hq, Lq); got ", lse.sizes());
  check_on_device("grad_out", grad_out, q);
  const at::Tensor dout = rows_contiguous(grad_out.to(q.scalar_type()));
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse) delta = delta - grad_lse->to(at::kFloat);
  delta = delta.contiguous();
  at::Tensor dq = at::empty({B, Hq, Lq, p.head_dim}, r.q.options());
  at::Tensor dk = at::empty({B, p.kv_heads, p.k_len, p.head_dim}, r.q.options());
  at::Tensor dv = at::empty({B, p.kv_heads, p.k_len, p.v_head_dim}, r.q.options());
  at::Tensor dbias = bias_grad ? at::zeros({B, Hq, Lq, p.k_len}, r.q.options().dtype(at::kFloat))
                               : at::empty({0}, r.q.options().dtype(at::kFloat));
  std::string error;
  const AttentionBwdPlan plan =
      plan_attention_bwd(r.dtype, p.head_dim, p.v_head_dim, Lq, p.k_len, B, Hq, p.kv_heads, shared_limit(), error);
  TORCH_CHECK(error.empty(), kWhat, ": ", error);
  AttentionBwdParams bp{};
  bp.fwd = p;
  bp.dout = dout.const_data_ptr(), bp.lse = lse_f.const_data_ptr<float>(), bp.delta = delta.const_data_ptr<float>();
  bp.dq = dq.mutable_data_ptr(), bp.dk = dk.mutable_data_ptr(), bp.dv = dv.mutable_data_ptr();
  bp.dbias = bias_grad ? dbias.mutable_data_ptr<float>() : nullptr;
  strides_of(dout, bp.dout_stride);
  run_launch(kWhat, [&](Stream s) { return launch_attention_bwd(bp, plan, s); });
  return {dq, dk, dv, dbias};
}

}  // namespace

#if defined(BMK_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(bmkernels, CPU, m) {
  m.impl("attention_emulated_fwd", &AttentionFwdArgs::entry<&attention_fwd>);
  m.impl("attention_emulated_bwd", &AttentionBwdArgs::entry<&attention_bwd>);
}
#else
TORCH_LIBRARY_IMPL(bmkernels, CUDA, m) {
  m.impl("attention_fwd", &AttentionFwdArgs::entry<&attention_fwd>);
  m.impl("attention_bwd", &AttentionBwdArgs::entry<&attention_bwd>);
}
#endif

}  // namespace bmk::BMK_CUDA_NS
