#pragma once
// SIMT emulator runtime (g++ builds only; see docs/cuda.md): runs a CUDA kernel body on the CPU with
// one fiber per CUDA thread of a block. __syncthreads and warp collectives are fiber barriers; shared
// memory is a per-block buffer with a shadow race detector: per byte, the thread that last wrote and
// read it and in which barrier interval; two threads touching a byte in the same interval (one of them
// writing) is a race unless a __syncwarp ordered them within one warp.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace bmk::emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Runs body once per thread of every block of grid; throws std::runtime_error naming the first
// shared-memory races, a deadlock (a barrier some threads never reach) or a kernel check that failed.
void launch(Dim3 grid, Dim3 block, size_t shared_bytes, const std::function<void()>& body);
// A cooperative launch (cudaLaunchCooperativeKernel): every block resident at once, their fibers interleaved,
// so that grid_sync() can hold all threads of the grid; errors as launch's.
void launch_cooperative(Dim3 grid, Dim3 block, size_t shared_bytes, const std::function<void()>& body);

// The calling fiber's coordinates.
Dim3 thread_idx();
Dim3 block_idx();
Dim3 block_dim();
Dim3 grid_dim();
int lane_id();

// Shared memory of the running block, and its checked accesses (every kernel access goes through these).
unsigned char* shared_base();
void shared_read(const void* p, size_t bytes);
void shared_write(const void* p, size_t bytes);
// A read made by another lane of the calling thread's warp (inside a warp collective's combine).
void shared_read_by_lane(int lane, const void* p, size_t bytes);

// A cp.async copy: lands (is written, and race-checked) when its group is waited for.
void async_copy(void* shared_dst, const void* global_src, size_t bytes, size_t src_bytes);
void async_commit();
void async_wait(int pending_groups);

void syncthreads();
// The grid-wide barrier of a cooperative launch (cooperative_groups' grid.sync()); it ends every block's barrier
// interval too. Global memory is not race-checked: the barrier is what orders it.
void grid_sync();
void syncwarp();

// A warp collective: every active lane of the warp calls it with the same kind; the last to arrive runs
// combine(ins, outs) over all lanes' in/out pointers (index = lane), then all continue.
using Combine = std::function<void(const void* const* ins, void* const* outs, int lanes)>;
void warp_collective(int kind, const void* in, void* out, const Combine& combine);

// A failed device-side check: recorded, the fiber stops, launch throws.
[[noreturn]] void fail(const std::string& what);

}  // namespace bmk::emu
