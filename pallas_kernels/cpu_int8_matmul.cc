// int8 weight-only matmul for the CPU backend, as an XLA FFI custom call (pallas_kernels/cpu_int8.py builds and
// registers it). XLA:CPU does not fuse an int8 -> float convert into a dot: the convert writes a float copy of
// the matrix that the dot then reads, so a decode step reads 4 bytes per weight and writes 4 more. Here each
// weight is read once, as one byte, converted in registers and multiplied at once.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[k, n]      layout "io": w [K, N] (a Linear kernel, an untied head)
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      layout "oi": w [N, K] (a tied embedding used as the head)
//
// For few rows (decode): the work is memory-bound, the weights stream through once for all rows. Output columns
// are cut into blocks; half of the blocks run on XLA's intra-op thread pool, the other half on the calling
// thread. Accumulation is in float32, in k order for "io" and in 8 interleaved partial sums for "oi": results
// differ from XLA's dot by float32 rounding only (tests/test_cpu_int8.py checks against a float64 reference).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 16;   // the Python side only routes calls with at most this many rows here
constexpr int64_t kBlockIO = 256;  // output columns per block, "io": kMaxRows x 256 floats of accumulators

// Columns [n0, n1) of y for layout io. Per k, the block's weights are converted once into `wf` and used for
// every row.
void BlockIO(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  alignas(64) float acc[kMaxRows][kBlockIO];
  alignas(64) float wf[kBlockIO];
  const int64_t nb = n1 - n0;
  for (int64_t m = 0; m < M; ++m) std::memset(acc[m], 0, sizeof(float) * nb);
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* row = w + k * N + n0;
    for (int64_t j = 0; j < nb; ++j) wf[j] = static_cast<float>(row[j]);
    for (int64_t m = 0; m < M; ++m) {
      const float xm = x[m * K + k];
      float* a = acc[m];
      for (int64_t j = 0; j < nb; ++j) a[j] += xm * wf[j];
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < nb; ++j) y[m * N + n0 + j] = acc[m][j] * scale[n0 + j];
}

// Rows [n0, n1) of w (= columns of y) for layout oi: each output is a dot over k, in 8 lanes.
void BlockOI(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    float acc[kMaxRows][8] = {};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      float wf[8];
      for (int l = 0; l < 8; ++l) wf[l] = static_cast<float>(row[k + l]);
      for (int64_t m = 0; m < M; ++m)
        for (int l = 0; l < 8; ++l) acc[m][l] += x[m * K + k + l] * wf[l];
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = ((acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3])) +
                ((acc[m][4] + acc[m][5]) + (acc[m][6] + acc[m][7]));
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * static_cast<float>(row[kk]);
      y[m * N + n] = s * scale[n];
    }
  }
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t layout) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("int8 matmul: x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1];
  const bool io = layout == 0;
  const int64_t N = io ? wd[1] : wd[0];
  if ((io ? wd[0] : wd[1]) != K) return ffi::Error::InvalidArgument("int8 matmul: x and w disagree on K");
  if (M > kMaxRows) return ffi::Error::InvalidArgument("int8 matmul: more rows than the kernel takes");
  if (static_cast<int64_t>(scale.element_count()) != N)
    return ffi::Error::InvalidArgument("int8 matmul: scale must have one entry per output column");
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.0f);
    return ffi::Error::Success();
  }
  auto run = [=](int64_t n0, int64_t n1) {
    if (io) {
      for (int64_t a = n0; a < n1; a += kBlockIO) BlockIO(xp, wp, sp, yp, M, K, N, a, std::min(a + kBlockIO, n1));
    } else {
      BlockOI(xp, wp, sp, yp, M, K, N, n0, n1);
    }
  };
  // Two halves: one on the pool, one here. Small matrices stay on this thread (a task costs microseconds).
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(2, pool.num_threads()));
  if (threads < 2 || N * K < (1 << 16)) {
    run(0, N);
    return ffi::Error::Success();
  }
  const int64_t unit = io ? kBlockIO : 8;
  const int64_t half = std::min(N, (N / 2 + unit - 1) / unit * unit);
  // The second half goes to the pool, but whoever gets to it first runs it: the pool's threads may all be busy
  // (XLA runs independent ops side by side, and this call may itself be on a pool thread), so waiting for the
  // task without claiming it could deadlock. The task may start after this call returned: it shares only `sh`.
  struct Shared {
    std::atomic<bool> claimed{false};
    std::atomic<bool> done{false};
  };
  auto sh = std::make_shared<Shared>();
  pool.Schedule([sh, run, half, N]() {
    if (sh->claimed.exchange(true)) return;
    run(half, N);
    sh->done.store(true, std::memory_order_release);
  });
  run(0, half);
  if (!sh->claimed.exchange(true)) {
    run(half, N);
  } else {
    while (!sh->done.load(std::memory_order_acquire)) std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SglJaxInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layout"));
