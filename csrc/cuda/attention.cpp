// Torch glue of the CUDA attention kernels: argument checks, outputs, parameters, launch. Compiled
// twice: for CUDA tensors (TORCH_LIBRARY_IMPL(bmkernels, CUDA): device guard, current stream, caching
// allocator, no host sync) and, with BMK_CUDA_EMULATOR, for CPU tensors as the operators
// attention_emulated_* that run the same kernel sources in the SIMT emulator (backend "cuda_emulated").
#include "cuda/attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "common/attention_math.h"

#if !defined(BMK_CUDA_EMULATOR)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace bmk::BMK_CUDA_NS {
namespace {

#if defined(BMK_CUDA_EMULATOR)
constexpr const char* kWhat = "bmkernels attention (CUDA kernel, emulated)";
constexpr size_t kSharedLimit = 227 * 1024;  // sm_90's opt-in limit: the emulator checks the largest plan
bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
#else
constexpr const char* kWhat = "bmkernels attention (CUDA kernel)";
bool on_device(const at::Tensor& t) { return t.is_cuda(); }
#endif

CudaDtype dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return CudaDtype::f16;
    case at::kBFloat16:
      return CudaDtype::bf16;
    case at::kFloat:
      return CudaDtype::f32;
    default:
      TORCH_CHECK(false, kWhat, ": q must be float16, bfloat16 or float32; got ", t);
  }
}

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

std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& rng_seed, double scale, double softcap, int64_t window_left, int64_t window_right,
    int64_t diag_offset, double dropout_p, const std::optional<at::Tensor>& key_range,
    const std::optional<at::Tensor>& segments) {
  TORCH_CHECK(!segments, kWhat,
              ": packed sequences (segments) are not supported by the CUDA kernel yet; use "
              "backend='triton' or pad the batch");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, kWhat,
              ": q, k, v must be 4-D (B, H, L, D); got q ", q_in.sizes(), ", k ", k_in.sizes(), ", v ", v_in.sizes());
  TORCH_CHECK(on_device(q_in), kWhat, ": q must be a ",
#if defined(BMK_CUDA_EMULATOR)
              "CPU",
#else
              "CUDA",
#endif
              " tensor; got ", q_in.device());
  check_on_device("k", k_in, q_in);
  check_on_device("v", v_in, q_in);
  const CudaDtype dtype = dtype_code(q_in.scalar_type());
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
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(q_in.device());
#endif
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  // out laid out as q is (as the CPU kernel's): (B, Lq, Hq, Dv) storage for the projection layout
  at::Tensor out = q.stride(1) < q.stride(2) ? at::empty({B, Lq, Hq, Dv}, q.options()).transpose(1, 2)
                                             : at::empty({B, Hq, Lq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));

  std::string error;
#if defined(BMK_CUDA_EMULATOR)
  const size_t shared_limit = kSharedLimit;
#else
  const size_t shared_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
#endif
  const AttentionFwdPlan plan = plan_attention_fwd(dtype, D, Dv, Lq, Lk, B, Hq, shared_limit,
                                                   aligned16(q) && aligned16(k) && aligned16(v), error);
  TORCH_CHECK(error.empty(), kWhat, ": ", error);
  if (plan.empty()) return {out, lse};

  const std::vector<int64_t> grid{B, Hq, Lq, Lk};
  AttentionFwdParams p{};
  p.q = q.const_data_ptr(), p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr(), p.lse = lse.mutable_data_ptr<float>();
  strides_of(q, p.q_stride), strides_of(k, p.k_stride), strides_of(v, p.v_stride), strides_of(out, p.out_stride);
  at::Tensor bias_e, mask_e, alibi, ranges, seed;
  if (bias) {
    check_on_device("bias", *bias, q);
    TORCH_CHECK(bias->scalar_type() == q.scalar_type(), kWhat, ": bias must have q's dtype ", q.scalar_type(), "; got ",
                bias->scalar_type());
    bias_e = bias->expand(grid);
    p.bias = bias_e.const_data_ptr();
    for (int d = 0; d < 4; ++d) p.bias_stride[d] = bias_e.stride(d);
  }
  if (mask) {
    check_on_device("mask", *mask, q);
    TORCH_CHECK(mask->scalar_type() == at::kBool, kWhat, ": mask must be bool; got ", mask->scalar_type());
    mask_e = mask->expand(grid);
    p.mask = mask_e.const_data_ptr<bool>();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask_e.stride(d);
  }
  if (alibi_slopes) {
    check_on_device("alibi_slopes", *alibi_slopes, q);
    TORCH_CHECK(alibi_slopes->is_floating_point() && (alibi_slopes->dim() == 1 || alibi_slopes->dim() == 2), kWhat,
                ": alibi_slopes must be floating (Hq,) or (B, Hq); got ", alibi_slopes->sizes());
    alibi = alibi_slopes->to(at::kFloat).expand({B, Hq}).contiguous();
    p.alibi = alibi.const_data_ptr<float>();
  }
  if (key_range) {
    check_on_device("key_range", *key_range, q);
    TORCH_CHECK(key_range->scalar_type() == at::kLong && key_range->dim() == 2 && key_range->size(0) == B &&
                    key_range->size(1) == 2,
                kWhat, ": key_range must be int64 (B, 2) = (", B, ", 2); got ", key_range->scalar_type(), " ",
                key_range->sizes());
    ranges = key_range->contiguous();
    p.key_range = ranges.const_data_ptr<int64_t>();
  }
  if (dropout_p > 0) {
    TORCH_CHECK(rng_seed && rng_seed->scalar_type() == at::kLong && rng_seed->numel() >= 1, kWhat,
                ": dropout needs rng_seed, an int64 tensor with one element");
    seed = rng_seed->to(q.device()).contiguous();  // read by the kernel: no host sync, graph-capturable
    p.seed = seed.const_data_ptr<int64_t>();
  }
  const AttentionWindow win = saturated_window(window_left, window_right, diag_offset, Lq, Lk);
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hkv, p.q_len = Lq, p.k_len = Lk, p.head_dim = D, p.v_head_dim = Dv;
  p.window_left = win.left, p.window_right = win.right, p.diag_offset = win.diag_offset;
  p.scale = static_cast<float>(scale), p.softcap = static_cast<float>(softcap);
  p.dropout_p = static_cast<float>(dropout_p);
#if defined(BMK_CUDA_EMULATOR)
  try {
    launch_attention_fwd(p, plan, nullptr);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, kWhat, ": ", e.what());
  }
#else
  const int err = launch_attention_fwd(p, plan, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, kWhat, ": launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  return {out, lse};
}

}  // namespace

#if defined(BMK_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(bmkernels, CPU, m) { m.impl("attention_emulated_fwd", &attention_fwd); }
#else
TORCH_LIBRARY_IMPL(bmkernels, CUDA, m) { m.impl("attention_fwd", &attention_fwd); }
#endif

}  // namespace bmk::BMK_CUDA_NS
