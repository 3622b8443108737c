#pragma once
// Large CPU buffers reused across calls. glibc hands allocations above ~32 MB straight to mmap and
// returns them to the system on free (and trims the heap above its top-pad), so a kernel's fresh
// multi-megabyte buffers page-fault in again on every call (a large share of a big GRU layer's
// forward+backward; docs/gru.md). cached_empty keeps freed blocks for the next call
// of the same size, up to a cap (BMK_CPU_CACHE_MB, default 1024; 0 turns the cache off).
// Compiled once (not per ISA): one pool per process.
#include <ATen/ATen.h>

#include <cstdint>

namespace bmk::cpu {

// An uninitialized contiguous tensor; its storage comes from the pool when it is large enough to matter
// (else at::empty) and goes back to it when the tensor is freed. Not resizable: for kernel workspaces
// and temporaries, not for outputs a user may resize.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes the pool holds in freed blocks, and a release of all of them (bmkernels.empty_cache()).
int64_t cached_bytes();
void release_cached_blocks();

}  // namespace bmk::cpu
