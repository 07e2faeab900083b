// CPU emulation of the slice of CUDA that csrc/lowrank_linear_kernels.cuh uses, so its kernels
// run unchanged on a machine without a GPU (tests/test_cuda_emulation.py). Not a CUDA runtime:
// it has no API calls, only what device code touches.
//
// Each CUDA thread of a block is a fiber with its own stack; blocks run one after another.
// A fiber starts with makecontext/setcontext and then switches with GCC's __builtin_setjmp /
// __builtin_longjmp: unlike swapcontext they make no system call, and unlike longjmp they are
// not intercepted by AddressSanitizer (whose interceptor clears the shadow of the whole stack
// at every switch), which made the run 10x faster. A fiber runs until it reaches __syncthreads(), a warp shuffle, or its end; then
// the scheduler runs the next one, in a shuffled order that changes at every round, so a
// missing barrier shows up as a wrong result rather than being hidden by a lucky order.
// A barrier that not every live thread reaches is a deadlock here and aborts with a message.
// __shared__ variables become function statics: one copy, shared by the block's fibers.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation error: %s\n", what);
  std::abort();
}

enum class Wait { Running, Block, Warp, Done };

struct Thread {
  ucontext_t context;  // where the fiber starts
  void* resume[5];     // where it continues (a __builtin_setjmp buffer)
  bool started = false;
  dim3 index;
  Wait wait = Wait::Running;
  long tensor_core_ops = 0;  // warp-collective operations issued (must agree across a warp)
  void* fake_stack = nullptr;
};

struct Block {
  dim3 index, dim, grid;
  std::vector<Thread> threads;
  void* scheduler[5];
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack = nullptr;  // the scheduler's stack, learnt at the first switch (ASan)
  size_t scheduler_stack_size = 0;
  int current = 0;
  std::function<void()> body;
  std::vector<float> shuffle_slots;
  std::mt19937 order_rng{12345};
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline Thread& this_thread() { return block()->threads[block()->current]; }

constexpr size_t kStackBytes = 128 * 1024;  // the kernels' fragments, with ASan's redzones

// __builtin_longjmp may not share a function with the __builtin_setjmp it could return to.
// ASan would unpoison the whole stack before the jump (and before any call to a function it
// sees as noreturn, hence the test); the frames left behind are live, so neither is wanted.
__attribute__((noinline, no_sanitize_address)) inline void jump(void** target) {
  if (target != nullptr) __builtin_longjmp(target, 1);
}

// One stack per thread slot, allocated once for the whole run (not zeroed): allocating and
// clearing 1024 stacks per launch would dominate the run time.
inline char* stack(int thread) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= thread) stacks.emplace_back(new char[kStackBytes]);
  return stacks[thread].get();
}

inline void to_scheduler() {
  Block& b = *block();
  Thread& t = this_thread();
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&t.fake_stack, b.scheduler_stack, b.scheduler_stack_size);
#endif
  if (__builtin_setjmp(t.resume) == 0) jump(b.scheduler);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
}

inline void fiber_entry() {
  Block& b = *block();
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  b.body();
  this_thread().wait = Wait::Done;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.scheduler_stack, b.scheduler_stack_size);  // finished: no fake stack to keep
#endif
  jump(b.scheduler);  // never returns: the fiber's stack is simply abandoned
}

// Run thread i until it waits or ends.
__attribute__((noinline)) inline void resume(Block& b, int i) {
  Thread& t = b.threads[i];
  b.current = i;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, stack(i), kStackBytes);
#endif
  if (__builtin_setjmp(b.scheduler) == 0) {
    if (!t.started) {
      t.started = true;
      setcontext(&t.context);
    }
    jump(t.resume);
  }
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
}

inline void check_warp_agreement(const Block& b) {
  const int n = static_cast<int>(b.threads.size());
  for (int w = 0; w * 32 < n; ++w) {
    long ops = -1;
    for (int l = w * 32; l < std::min(n, w * 32 + 32); ++l) {
      if (b.threads[l].wait == Wait::Done) continue;
      if (ops >= 0 && b.threads[l].tensor_core_ops != ops)
        fail("lanes of a warp issued different numbers of WMMA operations (divergent tensor-core code)");
      ops = b.threads[l].tensor_core_ops;
    }
  }
}

inline void run_block(Block& b) {
  const int n = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.threads.assign(n, Thread{});
  b.shuffle_slots.assign(n, 0.0f);
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.index = dim3(i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y));
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = stack(i);
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;  // a fiber never returns; it jumps back to the scheduler
    makecontext(&t.context, fiber_entry, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  for (;;) {
    std::shuffle(order.begin(), order.end(), b.order_rng);
    for (int i : order) {
      if (b.threads[i].wait == Wait::Running) resume(b, i);
    }
    // Every thread is now waiting or done.
    bool any_live = false, all_at_block = true;
    for (const Thread& t : b.threads) {
      if (t.wait == Wait::Done) continue;
      any_live = true;
      all_at_block = all_at_block && t.wait == Wait::Block;
    }
    if (!any_live) break;
    if (all_at_block) {
      check_warp_agreement(b);
      for (Thread& t : b.threads)
        if (t.wait == Wait::Block) t.wait = Wait::Running;
      continue;
    }
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
      bool all_at_warp = true, live = false;
      for (int l = w * 32; l < std::min(n, w * 32 + 32); ++l) {
        if (b.threads[l].wait == Wait::Done) continue;
        live = true;
        all_at_warp = all_at_warp && b.threads[l].wait == Wait::Warp;
      }
      if (live && all_at_warp) {
        for (int l = w * 32; l < std::min(n, w * 32 + 32); ++l)
          if (b.threads[l].wait == Wait::Warp) b.threads[l].wait = Wait::Running;
        released = true;
      }
    }
    if (!released) fail("deadlock: threads wait at different barriers (__syncthreads not reached by all threads?)");
  }
}

// Run kernel<<<grid, threads>>>(params) on the CPU, block after block.
template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, int threads, const Params& params) {
  if (threads <= 0 || threads % 32 != 0 || threads > 1024) fail("block size must be a positive multiple of 32, at most 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) fail("invalid grid");
  Block b;
  b.grid = grid;
  b.dim = dim3(threads);
  b.body = [&] { kernel(params); };
  Block* previous = block();
  block() = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.index = dim3(x, y, z);
        run_block(b);
      }
  block() = previous;
}

inline void warp_barrier() {
  this_thread().wait = Wait::Warp;
  to_scheduler();
}

}  // namespace emu

#define threadIdx (::emu::this_thread().index)
#define blockIdx (::emu::block()->index)
#define blockDim (::emu::block()->dim)
#define gridDim (::emu::block()->grid)

inline void __syncthreads() {
  emu::this_thread().wait = emu::Wait::Block;
  emu::to_scheduler();
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) emu::fail("only full-warp shuffles are emulated");
  emu::Block& b = *emu::block();
  const int me = b.current, lane = me % 32, base = me - lane;
  b.shuffle_slots[me] = v;
  emu::warp_barrier();
  const float other = b.shuffle_slots[base + (lane ^ lane_mask)];
  emu::warp_barrier();  // nobody overwrites a slot before every lane has read it
  return other;
}

inline float atomicAdd(float* address, float v) {
  const float old = *address;  // fibers never interleave inside a call
  *address = old + v;
  return old;
}
