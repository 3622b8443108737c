// SIMT emulator runtime (csrc/cuda/emulator.h): fibers (ucontext), barriers, warp collectives,
// cp.async groups and the shared-memory race detector. Blocks run one after another on the calling
// thread (a cooperative launch: all at once, for the grid barrier); the state is thread-local, so separate host
// threads may launch at the same time.
#include "cuda/emulator.h"

#include <ucontext.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

namespace bmk::emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxReports = 4;

struct Copy {
  void* dst;
  const void* src;
  size_t bytes, src_bytes;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Dim3 index;
  int tid = 0;
  bool done = false;
  const void* in = nullptr;  // this lane's operands of the warp collective it waits in
  void* out = nullptr;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
};

struct Warp {
  int size = 0, arrived = 0, kind = -1;
  uint64_t generation = 0;
  uint32_t sync_epoch = 1;  // advanced by __syncwarp: orders shared accesses within the warp
};

// Per shared byte: the last writer and reader, in which barrier interval (epoch) and warp sync epoch.
struct Shadow {
  int32_t writer = -1, reader = -1;
  uint32_t w_epoch = 0, w_warp_epoch = 0, r_epoch = 0, r_warp_epoch = 0;
  bool many_readers = false;  // more than one thread read it in r_epoch
};

struct Block;

// A cooperative launch's grid-wide barrier: every live thread of every block arrives.
struct GridBarrier {
  std::vector<Block*> blocks;
  int arrived = 0, live = 0;
  uint64_t generation = 0;
};

struct Block {
  Dim3 grid, dim, index;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;
  std::vector<Shadow> shadow;
  uint32_t epoch = 1;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  uint64_t changes = 0;  // any progress (arrivals, completions): a pass without any is a deadlock
  int current = 0, live = 0;
  ucontext_t own_scheduler;
  ucontext_t* scheduler = &own_scheduler;  // a cooperative launch's blocks share one
  GridBarrier* grid_barrier = nullptr;     // only in a cooperative launch
  std::vector<std::string> reports;
  size_t races = 0;
};

thread_local Block* g_block = nullptr;

Block& block() {
  if (!g_block) throw std::runtime_error("bmk emulator: device function called outside a launch");
  return *g_block;
}
Fiber& me() { return block().fibers[block().current]; }
int warp_of(int tid) { return tid / 32; }

void yield() { swapcontext(&me().context, block().scheduler); }

void report(const std::string& what) {
  Block& b = block();
  if (b.reports.size() < kMaxReports) b.reports.push_back(what);
}

std::string who(int tid) { return "thread " + std::to_string(tid); }

// Whether an earlier access by `other` in (epoch, warp_epoch) is unordered with one by thread `tid` now.
bool unordered(int other, uint32_t epoch, uint32_t warp_epoch, int tid) {
  Block& b = block();
  if (other < 0 || other == tid || epoch != b.epoch) return false;
  return !(warp_of(other) == warp_of(tid) && warp_epoch != b.warps[warp_of(tid)].sync_epoch);
}

void check_access(const void* p, size_t bytes, bool write, int tid) {
  Block& b = block();
  const auto* base = b.shared.data();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < base || c + bytes > base + b.shared.size()) {
    report(who(tid) + (write ? " wrote" : " read") + " shared memory out of bounds (offset " +
           std::to_string(c - base) + ", " + std::to_string(bytes) + " bytes, size " + std::to_string(b.shared.size()) +
           ")");
    fail("shared memory access out of bounds");
  }
  const uint32_t warp_epoch = b.warps[warp_of(tid)].sync_epoch;
  for (size_t i = 0; i < bytes; ++i) {
    const size_t offset = (c - base) + i;
    Shadow& s = b.shadow[offset];
    int conflict = -1;
    if (unordered(s.writer, s.w_epoch, s.w_warp_epoch, tid)) {
      conflict = s.writer;
    } else if (write && s.r_epoch == b.epoch &&
               (s.many_readers || unordered(s.reader, s.r_epoch, s.r_warp_epoch, tid))) {
      conflict = s.reader;
    }
    if (conflict >= 0) {
      if (b.races++ < kMaxReports)
        report("shared-memory race at byte " + std::to_string(offset) + ": " + who(tid) +
               (write ? " writes" : " reads") + " it in the barrier interval where " + who(conflict) +
               (conflict == s.writer ? " wrote" : " read") + " it (a missing __syncthreads or __syncwarp)");
      break;
    }
    if (write) {
      s.writer = tid, s.w_epoch = b.epoch, s.w_warp_epoch = warp_epoch;
    } else if (s.r_epoch == b.epoch && s.reader != tid && unordered(s.reader, s.r_epoch, s.r_warp_epoch, tid)) {
      s.many_readers = true;  // two unordered readers: any later write in this interval races
    } else if (s.r_epoch != b.epoch || s.reader != tid) {
      s.many_readers = s.many_readers && s.r_epoch == b.epoch;
      s.reader = tid, s.r_epoch = b.epoch, s.r_warp_epoch = warp_epoch;
    }
  }
}

void land(const Copy& c, int tid) {
  check_access(c.dst, c.bytes, true, tid);
  std::memset(c.dst, 0, c.bytes);
  if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
}

void fiber_main(unsigned lo, unsigned hi) {
  const auto* body = reinterpret_cast<const std::function<void()>*>((static_cast<uintptr_t>(hi) << 32) | lo);
  (*body)();
  Fiber& f = me();
  if (!f.open.empty() || !f.groups.empty()) report(who(f.tid) + " exited with cp.async copies never waited for");
  f.done = true;
  --block().live;
  if (block().grid_barrier) --block().grid_barrier->live;
  ++block().changes;
  // returning resumes uc_link, the scheduler
}

// Fresh fibers for body on block b (its index set), shared memory filled with garbage.
void start_block(Block& b, const std::function<void()>& body) {
  b.epoch = 1;
  b.barrier_arrived = 0;
  std::memset(b.shared.data(), 0xA5, b.shared.size());  // garbage: a read before any write shows up in results
  std::fill(b.shadow.begin(), b.shadow.end(), Shadow{});
  for (Warp& w : b.warps) w.arrived = 0, w.kind = -1;
  const auto address = reinterpret_cast<uintptr_t>(&body);
  b.live = static_cast<int>(b.fibers.size());
  for (Fiber& f : b.fibers) {
    f.done = false;
    f.groups.clear();
    f.open.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = b.scheduler;
    makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_main), 2, static_cast<unsigned>(address),
                static_cast<unsigned>(address >> 32));
  }
}

// Runs the blocks' fibers in turn until all have finished or one reported; a pass without progress is a deadlock.
// Returns the first block with reports, or null.
Block* run_blocks(const std::vector<Block*>& blocks) {
  const auto first_reported = [&]() -> Block* {
    for (Block* b : blocks)
      if (!b->reports.empty()) return b;
    return nullptr;
  };
  const auto live = [&] {
    int n = 0;
    for (Block* b : blocks) n += b->live;
    return n;
  };
  const auto changes = [&] {
    uint64_t n = 0;
    for (Block* b : blocks) n += b->changes;
    return n;
  };
  while (live() > 0 && !first_reported()) {
    const uint64_t before = changes();
    for (Block* b : blocks) {
      g_block = b;
      // each block as far as it goes before the next: a cooperative launch's blocks do not run in lockstep, so
      // one that reads another's results without a grid barrier reads them before they are written
      uint64_t seen;
      do {
        seen = b->changes;
        for (size_t i = 0; i < b->fibers.size() && b->reports.empty(); ++i) {
          if (b->fibers[i].done) continue;
          b->current = static_cast<int>(i);
          swapcontext(b->scheduler, &b->fibers[i].context);
        }
      } while (b->changes != seen && b->live > 0 && b->reports.empty());
    }
    if (changes() == before && live() > 0) {
      g_block = blocks.front();
      report("deadlock: " + std::to_string(live()) +
             " threads wait at a barrier or warp collective that the others never reach");
    }
  }
  return first_reported();
}

std::unique_ptr<Block> make_block(Dim3 grid, Dim3 block_dim, size_t shared_bytes) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (threads < 1 || threads > 1024) throw std::runtime_error("bmk emulator: block of " + std::to_string(threads));
  auto b = std::make_unique<Block>();
  b->grid = grid, b->dim = block_dim;
  b->fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b->fibers[t];
    f.stack.reset(new char[kStackBytes]);
    f.tid = t;
    f.index = {t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
  }
  b->warps.resize((threads + 31) / 32);
  for (int w = 0; w < static_cast<int>(b->warps.size()); ++w) b->warps[w].size = std::min(32, threads - 32 * w);
  b->shared.resize(shared_bytes);
  b->shadow.resize(shared_bytes);
  return b;
}

[[noreturn]] void throw_reports(const Block& b) {
  std::string text = "bmk emulator: block (" + std::to_string(b.index.x) + ", " + std::to_string(b.index.y) + ", " +
                     std::to_string(b.index.z) + "):";
  for (const std::string& r : b.reports) text += "\n  " + r;
  if (b.races > kMaxReports) text += "\n  (" + std::to_string(b.races) + " racing accesses in all)";
  throw std::runtime_error(text);
}

}  // namespace

void launch(Dim3 grid, Dim3 block_dim, size_t shared_bytes, const std::function<void()>& body) {
  const std::unique_ptr<Block> b = make_block(grid, block_dim, shared_bytes);
  Block* outer = g_block;
  Block* failed = nullptr;
  for (unsigned z = 0; z < grid.z && !failed; ++z)
    for (unsigned y = 0; y < grid.y && !failed; ++y)
      for (unsigned x = 0; x < grid.x && !failed; ++x) {
        b->index = {x, y, z};
        start_block(*b, body);
        failed = run_blocks({b.get()});
      }
  g_block = outer;
  if (failed) throw_reports(*failed);
}

void launch_cooperative(Dim3 grid, Dim3 block_dim, size_t shared_bytes, const std::function<void()>& body) {
  std::vector<std::unique_ptr<Block>> owned;
  GridBarrier barrier;
  ucontext_t scheduler;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        owned.push_back(make_block(grid, block_dim, shared_bytes));
        Block& b = *owned.back();
        b.index = {x, y, z}, b.scheduler = &scheduler, b.grid_barrier = &barrier;
        start_block(b, body);
        barrier.blocks.push_back(&b);
        barrier.live += b.live;
      }
  Block* outer = g_block;
  Block* failed = run_blocks(barrier.blocks);
  g_block = outer;
  if (failed) throw_reports(*failed);
}

Dim3 thread_idx() { return me().index; }
Dim3 block_idx() { return block().index; }
Dim3 block_dim() { return block().dim; }
Dim3 grid_dim() { return block().grid; }
int lane_id() { return me().tid % 32; }

unsigned char* shared_base() { return block().shared.data(); }
void shared_read(const void* p, size_t bytes) { check_access(p, bytes, false, me().tid); }
void shared_write(const void* p, size_t bytes) { check_access(p, bytes, true, me().tid); }
void shared_read_by_lane(int lane, const void* p, size_t bytes) {
  check_access(p, bytes, false, warp_of(me().tid) * 32 + lane);
}

void async_copy(void* dst, const void* src, size_t bytes, size_t src_bytes) {
  // on a GPU the copy may land any time from its issue to its wait: its destination counts as written at both
  check_access(dst, bytes, true, me().tid);
  me().open.push_back({dst, src, bytes, src_bytes});
}
void async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
void async_wait(int pending) {
  Fiber& f = me();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front()) land(c, f.tid);
    f.groups.erase(f.groups.begin());
  }
}

void syncthreads() {
  Block& b = block();
  const uint64_t generation = b.barrier_generation;
  ++b.changes;
  if (++b.barrier_arrived == b.live) {
    b.barrier_arrived = 0;
    ++b.barrier_generation;
    ++b.epoch;
    return;
  }
  while (b.barrier_generation == generation) yield();
}

void grid_sync() {
  Block& b = block();
  GridBarrier* g = b.grid_barrier;
  if (!g) fail("grid barrier outside a cooperative launch (launch_cooperative)");
  const uint64_t generation = g->generation;
  ++b.changes;
  if (++g->arrived == g->live) {
    g->arrived = 0;
    ++g->generation;
    for (Block* other : g->blocks) ++other->epoch;  // it orders every block's shared memory too
    return;
  }
  while (g->generation == generation) yield();
}

void syncwarp() {
  warp_collective(-2, nullptr, nullptr, [](const void* const*, void* const*, int) {});
}

void warp_collective(int kind, const void* in, void* out, const Combine& combine) {
  Block& b = block();
  Fiber& f = me();
  Warp& w = b.warps[warp_of(f.tid)];
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (w.kind != kind) {
    fail("divergent warp collective: lanes of warp " + std::to_string(warp_of(f.tid)) + " called different ones (" +
         std::to_string(w.kind) + ", " + std::to_string(kind) + ")");
  }
  f.in = in, f.out = out;
  const uint64_t generation = w.generation;
  ++b.changes;
  if (++w.arrived == w.size) {
    const void* ins[32];
    void* outs[32];
    const int first = warp_of(f.tid) * 32;
    for (int l = 0; l < w.size; ++l) ins[l] = b.fibers[first + l].in, outs[l] = b.fibers[first + l].out;
    combine(ins, outs, w.size);
    w.arrived = 0;
    ++w.generation;
    if (kind == -2) ++w.sync_epoch;
    return;
  }
  while (w.generation == generation) yield();
}

void fail(const std::string& what) {
  Block& b = block();
  report(who(me().tid) + ": " + what);
  me().done = true;
  --b.live;
  if (b.grid_barrier) --b.grid_barrier->live;
  ++b.changes;
  setcontext(b.scheduler);
  __builtin_unreachable();
}

}  // namespace bmk::emu
