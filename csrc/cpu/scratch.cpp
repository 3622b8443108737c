// The CPU buffer pool of csrc/cpu/scratch.h.
#include "cpu/scratch.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace bmk::cpu {
namespace {

constexpr size_t kMinBytes = size_t(4) << 20;  // smaller blocks stay with malloc, which reuses them itself
constexpr size_t kGranule = size_t(2) << 20;   // block sizes are rounded up to this, so same-size calls match
constexpr size_t kAlignment = 64;

size_t cap_bytes() {
  static const size_t cap = [] {
    const char* env = std::getenv("BMK_CPU_CACHE_MB");
    const long long mb = env != nullptr && *env != '\0' ? std::atoll(env) : 1024;
    return mb > 0 ? size_t(mb) << 20 : size_t(0);
  }();
  return cap;
}

struct Pool {
  std::mutex mutex;
  std::multimap<size_t, void*> free_blocks;  // block size -> block
  size_t held = 0;                           // bytes in free_blocks
};

// Never destroyed: tensors freed during interpreter shutdown still return their blocks here.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void give_back(void* block, size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.held + bytes <= cap_bytes()) {
      p.free_blocks.emplace(bytes, block);
      p.held += bytes;
      return;
    }
  }
  std::free(block);
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t wanted = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (wanted < kMinBytes || cap_bytes() == 0) return at::empty(sizes, options);
  const size_t bytes = (wanted + kGranule - 1) / kGranule * kGranule;
  void* block = nullptr;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    if (auto it = p.free_blocks.find(bytes); it != p.free_blocks.end()) {
      block = it->second;
      p.free_blocks.erase(it);
      p.held -= bytes;
    }
  }
  if (block == nullptr) {
    block = std::aligned_alloc(kAlignment, bytes);
    TORCH_CHECK(block != nullptr, "bmkernels: out of memory allocating ", bytes, " bytes");
  }
  return at::from_blob(block, sizes, [bytes](void* ptr) { give_back(ptr, bytes); }, options.device(at::kCPU));
}

int64_t cached_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return static_cast<int64_t>(p.held);
}

void release_cached_blocks() {
  Pool& p = pool();
  std::multimap<size_t, void*> blocks;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    blocks.swap(p.free_blocks);
    p.held = 0;
  }
  for (auto& [bytes, block] : blocks) std::free(block);
}

}  // namespace bmk::cpu
