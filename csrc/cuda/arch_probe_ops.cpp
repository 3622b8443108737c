// Torch glue of the probe kernels (csrc/cuda/arch_probe.cu): CUDA tensors, or CPU tensors in an emulator build.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/arch_probe.h"
#include "cuda/torch_launch.h"

namespace bmk::BMK_CUDA_NS {
namespace {

// The device of `on` current for the launch (the emulator needs none).
template <typename F>
void run(const char* what, const at::Tensor& on, F&& launch) {
#if defined(BMK_CUDA_EMULATOR)
  (void)on;
#else
  const c10::cuda::CUDAGuard guard(on.device());
#endif
  run_launch(what, launch);
}

at::Tensor arch_probe(const at::Tensor& tile, bool bf16) {
  TORCH_CHECK(tile.numel() == 256 && tile.element_size() == 2,
              "arch_probe: tile must be 16 x 16 of a 2-byte dtype; got ", tile.sizes(), " ", tile.scalar_type());
  const at::Tensor t = tile.contiguous();
  at::Tensor out = at::empty({32, kArchProbeWords}, t.options().dtype(at::kInt));
  run("arch_probe", t, [&](Stream s) {
    return launch_arch_probe(static_cast<const uint16_t*>(t.const_data_ptr()), bf16,
                             reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>()), s);
  });
  return out;
}

at::Tensor arch_race_demo(const at::Tensor& device_like, int64_t variant) {
  TORCH_CHECK(variant >= 0 && variant <= 4, "arch_race_demo: variant must be in [0, 4]; got ", variant);
  at::Tensor out = at::empty({2, 64}, device_like.options().dtype(at::kInt));
  run("arch_race_demo", out,
      [&](Stream s) { return launch_arch_race_demo(static_cast<int>(variant), out.mutable_data_ptr<int32_t>(), s); });
  return out;
}

}  // namespace

#if defined(BMK_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(bmkernels, CPU, m) {
#else
TORCH_LIBRARY_IMPL(bmkernels, CUDA, m) {
#endif
  m.impl("arch_probe", &arch_probe);
  m.impl("arch_race_demo", &arch_race_demo);
}

}  // namespace bmk::BMK_CUDA_NS
