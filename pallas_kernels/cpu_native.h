// Shared by the native CPU kernels (cpu_matmul.cc, cpu_paged_attention.cc); cpu_native.py builds each kernel with
// this folder on the include path and rebuilds it when this file changes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

namespace sgl_jax_native {

// CPUs this process may run on (its affinity mask on Linux: a container's share, not the host's count). The
// kernels run at most this many threads: the calling one and UsableCpus() - 1 helpers on XLA's pool.
inline int64_t UsableCpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

}  // namespace sgl_jax_native
