// Shared by the native CPU kernels (cpu_matmul.cc, cpu_paged_attention.cc); cpu_native.py builds each kernel with
// this folder on the include path and rebuilds it when this file changes.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace sgl_jax_native {

// CPUs this process may run on (its affinity mask on Linux: a container's share, not the host's count).
inline int64_t UsableCpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// Threads a kernel call runs on: this one and one helper per other usable CPU on XLA's pool (at most one per pool
// thread; more put three threads on two cores: see RunUnits).
inline int64_t CallThreads(xla::ffi::ThreadPool& pool) {
  return 1 + std::min<int64_t>(pool.num_threads(), UsableCpus() - 1);
}

// fn(u) for every u in [0, units), returning when all have run. Units are claimed from a shared counter by this
// thread and by helpers on XLA's pool, so a thread slowed by other work (XLA runs independent ops side by side;
// the host may be shared) takes fewer, and a helper that never gets to run is never waited for. Helpers: one fewer
// than the usable CPUs (this thread is the other), at most one per pool thread, never more than the units beyond
// the first; one per pool thread put three threads on two cores and made 1-row calls 1.4-1.8x slower
// (bench/notes.md, "Panel-packed weights"). A helper that starts after the last unit was claimed returns at once:
// it holds only the shared counter and never calls fn, whose captures may be gone by then.
template <typename F>
void RunUnits(xla::ffi::ThreadPool& pool, int64_t units, F fn) {
  struct Counter {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  if (units <= 0) return;
  auto c = std::make_shared<Counter>();
  auto work = [c, fn, units]() {
    for (int64_t u; (u = c->next.fetch_add(1)) < units;) {
      fn(u);
      c->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(CallThreads(pool) - 1, units - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  while (c->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

// fn(u, end) for every u in [0, units) on `lanes` threads -- this one and lanes - 1 that `schedule(task)` starts --
// with the units cut into one contiguous range per thread (this thread the first): a thread runs its own range in
// order, then takes the units left in the others' ranges from their far ends; `end` is the end of the range u lies
// in (a thread's next unit, unless another took it). Each range's first and last unclaimed units share one atomic
// word, so a unit is claimed exactly once (SglJaxRangesSelfTest in cpu_matmul.cc checks it under random delays). A
// task that starts after the last unit was claimed returns at once: it holds only the shared state and never calls
// fn, whose captures may be gone by then. Returns when every unit has run.
template <typename Schedule, typename F>
void RunRangesOn(int64_t lanes, Schedule schedule, int64_t units, F fn) {
  if (units <= 0) return;
  lanes = std::max<int64_t>(1, std::min(lanes, units));
  struct State {
    explicit State(int64_t n) : range(n) {}
    std::vector<std::atomic<uint64_t>> range;  // per range: first unclaimed unit << 32 | last unclaimed unit + 1
    std::atomic<int64_t> done{0};
  };
  auto st = std::make_shared<State>(lanes);
  for (int64_t l = 0; l < lanes; ++l)
    st->range[l].store(static_cast<uint64_t>(l * units / lanes) << 32 | static_cast<uint64_t>((l + 1) * units / lanes));
  auto work = [st, fn, units, lanes](int64_t own) {
    for (int64_t k = 0; k < lanes; ++k) {
      const int64_t l = (own + k) % lanes, end = (l + 1) * units / lanes;
      std::atomic<uint64_t>& r = st->range[l];
      for (;;) {  // own range from its front, the others from their backs
        uint64_t v = r.load(std::memory_order_relaxed), next;
        int64_t u;
        do {
          const uint64_t a = v >> 32, b = v & 0xffffffffu;
          if (a >= b) {
            u = -1;
            break;
          }
          u = static_cast<int64_t>(k == 0 ? a : b - 1);
          next = k == 0 ? (a + 1) << 32 | b : a << 32 | (b - 1);
        } while (!r.compare_exchange_weak(v, next, std::memory_order_acq_rel, std::memory_order_relaxed));
        if (u < 0) break;
        fn(u, end);
        st->done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  for (int64_t i = 1; i < lanes; ++i) schedule([work, i]() { work(i); });
  work(0);
  while (st->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

// RunUnits' threads (this one and up to one helper per other usable CPU on XLA's pool), each with a contiguous range
// of the units (RunRangesOn): a thread's memory stream runs on from one unit to the next, where RunUnits hands
// consecutive units to alternate threads (bench/notes.md, "Matmul units: one memory stream a thread").
template <typename F>
void RunRanges(xla::ffi::ThreadPool& pool, int64_t units, F fn) {
  RunRangesOn(CallThreads(pool), [&pool](auto task) { pool.Schedule(std::move(task)); }, units, fn);
}

}  // namespace sgl_jax_native
