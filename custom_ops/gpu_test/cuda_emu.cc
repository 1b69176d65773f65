// Fiber scheduler of the CUDA emulator (see cuda_emu.h).
#include "cuda_emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace emu {

uint3 thread_idx = {0, 0, 0};
uint3 block_idx = {0, 0, 0};
dim3 block_dim(1, 1, 1);
dim3 grid_dim(1, 1, 1);

namespace {

enum State { kRunnable, kAtBarrier, kAtWarpBarrier, kDone };

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  State state = kDone;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  ucontext_t main_ctx;
  const std::function<void()>* body = nullptr;
  int nthreads = 0;
  int current = -1;
  int live = 0;
  int at_barrier = 0;
  std::vector<int> warp_live, warp_at;
  std::vector<uint64_t> slots;
  std::mt19937 rng{12345};
  std::string thread_order = "fwd", block_order = "fwd";

  Scheduler() : fibers(kMaxThreads), stacks(kMaxThreads * kStackBytes), slots(kMaxThreads) {
    if (const char* e = std::getenv("TFPN_EMU_THREAD_ORDER")) thread_order = e;
    if (const char* e = std::getenv("TFPN_EMU_BLOCK_ORDER")) block_order = e;
    if (const char* e = std::getenv("TFPN_EMU_SEED")) rng.seed(std::strtoul(e, nullptr, 10));
  }

  void yield() {
    Fiber& f = fibers[current];
    swapcontext(&f.ctx, &main_ctx);
  }

  void release_barrier_if_complete() {
    if (at_barrier > 0 && at_barrier == live) {
      for (int i = 0; i < nthreads; ++i)
        if (fibers[i].state == kAtBarrier) fibers[i].state = kRunnable;
      at_barrier = 0;
    }
  }
  void release_warp_if_complete(int w) {
    if (warp_at[w] > 0 && warp_at[w] == warp_live[w]) {
      for (int i = w * 32; i < std::min(nthreads, w * 32 + 32); ++i)
        if (fibers[i].state == kAtWarpBarrier) fibers[i].state = kRunnable;
      warp_at[w] = 0;
    }
  }

  void arrive_block() {
    fibers[current].state = kAtBarrier;
    ++at_barrier;
    release_barrier_if_complete();
    yield();
  }
  void arrive_warp() {
    const int w = current / 32;
    fibers[current].state = kAtWarpBarrier;
    ++warp_at[w];
    release_warp_if_complete(w);
    yield();
  }

  static void trampoline(int i) {
    Scheduler& s = instance();
    (*s.body)();
    s.fibers[i].state = kDone;
    --s.live;
    const int w = i / 32;
    --s.warp_live[w];
    s.release_barrier_if_complete();
    s.release_warp_if_complete(w);
    // returning resumes uc_link (main_ctx)
  }

  std::vector<int> order(int n, const std::string& how) {
    std::vector<int> o(n);
    for (int i = 0; i < n; ++i) o[i] = i;
    if (how == "rev") std::reverse(o.begin(), o.end());
    if (how == "rand") std::shuffle(o.begin(), o.end(), rng);
    return o;
  }

  void set_thread_index(int i) {
    thread_idx.x = static_cast<unsigned>(i) % block_dim.x;
    thread_idx.y = (static_cast<unsigned>(i) / block_dim.x) % block_dim.y;
    thread_idx.z = static_cast<unsigned>(i) / (block_dim.x * block_dim.y);
  }

  void run_block() {
    live = nthreads;
    at_barrier = 0;
    const int nwarps = (nthreads + 31) / 32;
    warp_live.assign(nwarps, 0);
    warp_at.assign(nwarps, 0);
    for (int i = 0; i < nthreads; ++i) {
      ++warp_live[i / 32];
      Fiber& f = fibers[i];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks.data() + static_cast<size_t>(i) * kStackBytes;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &main_ctx;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&Scheduler::trampoline), 1, i);
      f.state = kRunnable;
    }
    while (live > 0) {
      bool progress = false;
      for (int i : order(nthreads, thread_order)) {
        if (fibers[i].state != kRunnable) continue;
        progress = true;
        current = i;
        set_thread_index(i);
        swapcontext(&main_ctx, &fibers[i].ctx);
      }
      if (!progress) {
        std::fprintf(stderr,
                     "cuda_emu: deadlock in block (%u,%u,%u): %d threads alive, %d at "
                     "__syncthreads (barrier in divergent code?)\n",
                     block_idx.x, block_idx.y, block_idx.z, live, at_barrier);
        std::abort();
      }
    }
    current = -1;
  }

  static Scheduler& instance() {
    static Scheduler* s = new Scheduler();
    return *s;
  }
};

}  // namespace

void sync_threads() { Scheduler::instance().arrive_block(); }
void sync_warp() { Scheduler::instance().arrive_warp(); }

uint64_t exchange(uint64_t mine, int src_lane) {
  Scheduler& s = Scheduler::instance();
  const int base = s.current & ~31;
  s.slots[s.current] = mine;
  s.arrive_warp();  // everybody has written
  const uint64_t got = s.slots[base + src_lane];
  s.arrive_warp();  // everybody has read
  return got;
}

void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  Scheduler& s = Scheduler::instance();
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > kMaxThreads) {
    std::fprintf(stderr, "cuda_emu: bad block size %d\n", nthreads);
    std::abort();
  }
  grid_dim = grid;
  block_dim = block;
  s.body = &body;
  s.nthreads = nthreads;
  const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  std::vector<long long> blocks(nblocks);
  for (long long b = 0; b < nblocks; ++b) blocks[b] = b;
  if (s.block_order == "rev") std::reverse(blocks.begin(), blocks.end());
  if (s.block_order == "rand") std::shuffle(blocks.begin(), blocks.end(), s.rng);
  for (long long b : blocks) {
    block_idx.x = static_cast<unsigned>(b % grid.x);
    block_idx.y = static_cast<unsigned>((b / grid.x) % grid.y);
    block_idx.z = static_cast<unsigned>(b / (static_cast<long long>(grid.x) * grid.y));
    s.run_block();
  }
}

}  // namespace emu
