// Few-row matmuls for the CPU backend, as XLA FFI custom calls (pallas_kernels/cpu_matmul.py builds and
// registers them), with int8 weights (and a float32 scale per output channel) or float32 weights.
//   int8: XLA:CPU does not fuse an int8 -> float convert into a dot: the convert writes a float copy of the
//   matrix that the dot then reads, so a decode step reads 4 bytes per weight and writes 4 more. Here each
//   weight is read once, as one byte, converted in registers and multiplied at once.
//   float32: for the LM head's 2-8 decode rows, where XLA:CPU's dot was 1.2-15x slower than this (bench/notes.md,
//   "Native paged attention on CPU"); the weights stream through once for all rows.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[k, n]      layout "io": w [K, N] (a Linear kernel, an untied head)
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      layout "oi": w [N, K] (a tied embedding used as the head)
//   (float32 weights have no scale)
//
// For few rows (decode): the work is memory-bound, the weights stream through once for all rows. Output columns
// are cut into blocks; half of the blocks run on XLA's intra-op thread pool, the other half on the calling
// thread. Accumulation is in float32, in k order for "io" and in 8 interleaved partial sums for "oi": results
// differ from XLA's dot by float32 rounding only (tests/test_cpu_matmul.py checks against a float64 reference).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 16;  // the Python side only routes calls with at most this many rows here

constexpr int64_t kPrefetch = 16;  // rows ahead (reading past the matrix is harmless: a prefetch never faults)

typedef float v8f __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));

// Eight int8 weights as eight floats. GCC does not vectorize __builtin_convertvector from int8 (it widens one
// element at a time), so x86 with AVX2 gets the two instructions by hand.
inline v8f Load8(const int8_t* p) {
#if defined(__AVX2__)
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  v8b b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, v8f);
#endif
}

inline v8f LoadF8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v8f Load8(const float* p) { return LoadF8(p); }

// the scale of output column n (float32 weights have none)
inline float Scale(const float* scale, int64_t n) { return scale ? scale[n] : 1.0f; }

// y[r0:r0+R, n0:n0+8C] for layout io, accumulators in registers: for each k, C groups of 8 weights are read once
// (one byte each), widened, and multiplied into every row of the tile.
template <int R, int C, typename W>
void TileIO(const float* x, const W* w, const float* scale, float* y, int64_t K, int64_t N, int64_t r0,
            int64_t n0) {
  v8f acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = v8f{};
  const float* xr = x + r0 * K;
  const W* wp = w + n0;
  for (int64_t k = 0; k < K; ++k, wp += N) {
    // the tile walks down the matrix with stride N: ask for the line kPrefetch rows ahead (the hardware
    // prefetchers do not follow a stride that crosses pages this often)
    constexpr int kLines = (sizeof(W) * 8 * C + 63) / 64;  // cache lines of the tile's row
    for (int l = 0; l < kLines; ++l) __builtin_prefetch(wp + kPrefetch * N + l * (64 / sizeof(W)));
    v8f xb[R];
    for (int r = 0; r < R; ++r) xb[r] = v8f{} + xr[r * K + k];
    for (int c = 0; c < C; ++c) {
      const v8f wv = Load8(wp + 8 * c);
      for (int r = 0; r < R; ++r) acc[r][c] += xb[r] * wv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int l = 0; l < 8; ++l) {
        const int64_t n = n0 + 8 * c + l;
        y[(r0 + r) * N + n] = acc[r][c][l] * Scale(scale, n);
      }
}

// The same for the last columns (< 8), one at a time.
template <typename W>
void TailIO(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
            int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * static_cast<float>(w[k * N + n]);
      y[m * N + n] = s * Scale(scale, n);
    }
}

// Columns [n0, n1) of y for layout io (n0 a multiple of 8): tiles of 64 columns for one row, 32 for two, 16 for
// groups of four rows (accumulators + one weight vector + the rows' broadcasts fit in 16 vector registers).
template <typename W>
void BlockIO(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  const int64_t full = n0 + (n1 - n0) / 8 * 8;
  int64_t n = n0;
  if (M == 1) {
    for (; n + 64 <= full; n += 64) TileIO<1, 8>(x, w, scale, y, K, N, 0, n);
    for (; n + 8 <= full; n += 8) TileIO<1, 1>(x, w, scale, y, K, N, 0, n);
  } else if (M == 2) {
    for (; n + 32 <= full; n += 32) TileIO<2, 4>(x, w, scale, y, K, N, 0, n);
    for (; n + 8 <= full; n += 8) TileIO<2, 1>(x, w, scale, y, K, N, 0, n);
  } else {
    for (; n + 16 <= full; n += 16) {
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) TileIO<4, 2>(x, w, scale, y, K, N, r, n);
      for (; r < M; ++r) TileIO<1, 2>(x, w, scale, y, K, N, r, n);
    }
    for (; n + 8 <= full; n += 8)
      for (int64_t r = 0; r < M; ++r) TileIO<1, 1>(x, w, scale, y, K, N, r, n);
  }
  if (full < n1) TailIO(x, w, scale, y, M, K, N, full, n1);
}

// Rows [n0, n1) of w (= columns of y) for layout oi: each output is a dot over k of a contiguous weight row;
// four outputs at a time share each load of x, in 8-lane partial sums reduced at the end.
template <int O, typename W>
void DotsOI(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
            int64_t n) {
  const int64_t k8 = K / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    v8f acc[O];
    for (int o = 0; o < O; ++o) acc[o] = v8f{};
    for (int64_t k = 0; k < k8; k += 8) {
      const v8f xv = LoadF8(xm + k);
      for (int o = 0; o < O; ++o) acc[o] += xv * Load8(w + (n + o) * K + k);
    }
    for (int o = 0; o < O; ++o) {
      float s = ((acc[o][0] + acc[o][1]) + (acc[o][2] + acc[o][3])) + ((acc[o][4] + acc[o][5]) + (acc[o][6] + acc[o][7]));
      for (int64_t k = k8; k < K; ++k) s += xm[k] * static_cast<float>(w[(n + o) * K + k]);
      y[m * N + n + o] = s * Scale(scale, n + o);
    }
  }
}

template <typename W>
void BlockOI(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) DotsOI<4>(x, w, scale, y, M, K, N, n);
  for (; n < n1; ++n) DotsOI<1>(x, w, scale, y, M, K, N, n);
}

// y = (x @ w) [* scale]; w's dims as stored ([K, N] for io, [N, K] for oi); no scale for float32 weights.
template <typename W>
ffi::Error Matmul(ffi::ThreadPool& pool, ffi::Span<const int64_t> xd, const float* xp, ffi::Span<const int64_t> wd,
                  const W* wp, const float* sp, int64_t scale_count, float* yp, int64_t layout) {
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("few-row matmul: x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1];
  const bool io = layout == 0;
  const int64_t N = io ? wd[1] : wd[0];
  if ((io ? wd[0] : wd[1]) != K) return ffi::Error::InvalidArgument("few-row matmul: x and w disagree on K");
  if (M > kMaxRows) return ffi::Error::InvalidArgument("few-row matmul: more rows than the kernel takes");
  if (sp && scale_count != N)
    return ffi::Error::InvalidArgument("few-row matmul: scale must have one entry per output column");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.0f);
    return ffi::Error::Success();
  }
  auto run = [=](int64_t n0, int64_t n1) {
    if (io) {
      BlockIO(xp, wp, sp, yp, M, K, N, n0, n1);
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
  const int64_t unit = io ? 64 : 8;
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

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t layout) {
  return Matmul<int8_t>(pool, x.dimensions(), x.typed_data(), w.dimensions(), w.typed_data(), scale.typed_data(),
                        static_cast<int64_t>(scale.element_count()), y->typed_data(), layout);
}

ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> y, int64_t layout) {
  return Matmul<float>(pool, x.dimensions(), x.typed_data(), w.dimensions(), w.typed_data(), nullptr, 0,
                       y->typed_data(), layout);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SglJaxF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layout"));
