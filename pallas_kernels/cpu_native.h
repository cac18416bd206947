// Shared by the native CPU kernels (cpu_matmul.cc, cpu_paged_attention.cc); cpu_native.py builds each kernel with
// this folder on the include path and rebuilds it when this file changes.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

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
  const int64_t helpers = std::min<int64_t>(std::min<int64_t>(pool.num_threads(), UsableCpus() - 1), units - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  while (c->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

}  // namespace sgl_jax_native
