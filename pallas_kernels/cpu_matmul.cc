// Matmuls for the CPU backend, as XLA FFI custom calls (pallas_kernels/cpu_matmul.py builds and registers them),
// with int8 weights (and a float32 scale per output channel) or float32 weights: few-row kernels for the plain
// [K, N] / [N, K] layouts first, then (below) the panel-packed kernel the engine uses for every step.
//   int8: XLA:CPU does not fuse an int8 -> float convert into a dot: the convert writes a float copy of the
//   matrix that the dot then reads, so a decode step reads 4 bytes per weight and writes 4 more. Here each
//   weight is read once, as one byte, converted in registers and multiplied at once.
//   float32: for the LM head's 2-8 decode rows, where XLA:CPU's dot was 1.2-15x slower than this (bench/notes.md,
//   "Native paged attention on CPU"); the weights stream through once for all rows.
// The panel-packed kernels (float32, then int8 in integer arithmetic) follow them.
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
#include <chrono>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_native.h"  // includes xla/ffi/api/ffi.h

namespace ffi = xla::ffi;

namespace {

using sgl_jax_native::RunRanges;
using sgl_jax_native::RunRangesOn;
using sgl_jax_native::RunUnits;

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

// x[0] in all eight lanes, straight from memory (a load, not a load and a shuffle)
inline v8f Bcast(const float* p) {
#if defined(__AVX2__)
  return (v8f)_mm256_broadcast_ss(p);
#else
  return v8f{} + *p;
#endif
}

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
  // Units of whole column blocks (64 columns for io, 8 rows of w for oi); small matrices stay on this thread
  // (a task costs microseconds).
  const int64_t unit = io ? 64 : 8, blocks = (N + unit - 1) / unit;
  const int64_t units = N * K < (1 << 16) ? 1 : std::min<int64_t>(blocks, 16);
  RunUnits(pool, units, [=](int64_t u) {
    run(std::min(N, u * blocks / units * unit), std::min(N, (u + 1) * blocks / units * unit));
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// Panel-packed float32 weights: w [P, K, 16] holds columns 16p .. 16p+15 of a [K, N] matrix, k-major inside the
// panel, so a tile of 16 output columns reads its weights as one contiguous stream (the [K, N] layout above reads
// 16 of every N values). Any number of rows:
//   M <= 8: one pass over the weights, the rows' accumulators in registers (1 row x 4 panels, 2 rows x 2 panels,
//           else tiles of 3-6 rows x 1 panel, each reading the panel from L1 after the first);
//   M > 8:  blocks of 96 rows x 256 k; a panel's 256 x 16 block is copied once into an aligned buffer in L1 that
//           every row tile of the block then reads (panels read in place were up to 2x slower at 16-64 rows:
//           bench/notes.md, "Panel-packed weights").
// (int8 packed weights have their own integer kernel, further down.)

constexpr int64_t kPanel = 16;
constexpr int64_t kKc = 256;  // k per block (a float32 panel block: 16 KB)
constexpr int64_t kMc = 96;   // rows per block (x's block: 96 KB, in L2)
constexpr int64_t kDirectRows = 8;  // up to here one pass over the weights, no k blocks

// y[r0.., c0..c0+16*NP) (+)= x[r0.., k0..k0+kn) @ panels; `wp` points at the first panel's row k0, `pstride` is
// the distance between panels. `acc_in`: add to y (a later k block). `pf`: the weights the next tile of this
// thread reads from memory, one 64-byte line of each of its NP panels a k fetched into L2 while this tile computes
// (float32 steps of 6-64 rows 1.13-1.32x faster; at 1-2 rows, which stream 1-4 panels at once, the hardware's
// prefetcher alone was faster: bench/notes.md, session 26).
template <int R, int NP>
inline void PanelTile(const float* x, int64_t ldx, const float* wp, int64_t pstride, int64_t kn, float* y,
                      int64_t ldy, bool acc_in, const float* pf = nullptr) {
  v8f acc[R][2 * NP];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NP; ++c) acc[r][c] = acc_in ? LoadF8(y + r * ldy + 8 * c) : v8f{};
  for (int64_t k = 0; k < kn; ++k) {
    if (pf)
      for (int p = 0; p < NP; ++p) __builtin_prefetch(pf + p * pstride + k * kPanel, 0, 2);  // prefetcht1
    for (int p = 0; p < NP; ++p) {
      const float* w = wp + p * pstride + k * kPanel;
      const v8f w0 = LoadF8(w), w1 = LoadF8(w + 8);
      for (int r = 0; r < R; ++r) {
        const v8f xr = Bcast(x + r * ldx + k);
        acc[r][2 * p] += xr * w0;
        acc[r][2 * p + 1] += xr * w1;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NP; ++c) std::memcpy(y + r * ldy + 8 * c, &acc[r][c], sizeof(v8f));
}

// R (1..6) rows x one panel, R chosen at run time
inline void PanelRows(int64_t R, const float* x, int64_t ldx, const float* wp, int64_t kn, float* y, int64_t ldy,
                      bool acc_in, const float* pf = nullptr) {
  switch (R) {
    case 1: return PanelTile<1, 1>(x, ldx, wp, 0, kn, y, ldy, acc_in, pf);
    case 2: return PanelTile<2, 1>(x, ldx, wp, 0, kn, y, ldy, acc_in, pf);
    case 3: return PanelTile<3, 1>(x, ldx, wp, 0, kn, y, ldy, acc_in, pf);
    case 4: return PanelTile<4, 1>(x, ldx, wp, 0, kn, y, ldy, acc_in, pf);
    case 5: return PanelTile<5, 1>(x, ldx, wp, 0, kn, y, ldy, acc_in, pf);
    default: return PanelTile<6, 1>(x, ldx, wp, 0, kn, y, ldy, acc_in, pf);
  }
}

inline const float* ScaleAt(const float* scale, int64_t c) { return scale ? scale + c : nullptr; }

// Rows cut into ceil(M / 6) tiles of nearly equal height (8 rows: 4 + 4, not 6 + 2): tile t covers
// [TileStart(t), TileStart(t + 1)).
inline int64_t TileStart(int64_t t, int64_t tiles, int64_t M) { return t * M / tiles; }

// Panels [p0, p1) of y for M <= kDirectRows rows: one pass over the weights; each panel (at most 96 KB at
// K = 1536) is read from memory once and from L1/L2 by the other row tiles.
void PanelsFew(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t p0, int64_t p1) {
  const int64_t ps = K * kPanel;
  int64_t p = p0;
  if (M == 1) {
    for (; p + 4 <= p1; p += 4) PanelTile<1, 4>(x, K, w + p * ps, ps, K, y + p * kPanel, N, false);
  } else if (M == 2) {
    for (; p + 2 <= p1; p += 2) PanelTile<2, 2>(x, K, w + p * ps, ps, K, y + p * kPanel, N, false);
  }
  const int64_t tiles = (M + 5) / 6;
  for (; p < p1; ++p)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = TileStart(t, tiles, M), r1 = TileStart(t + 1, tiles, M);
      PanelRows(r1 - r0, x + r0 * K, K, w + p * ps, K, y + r0 * N + p * kPanel, N, false,
                t == 0 && p + 1 < p1 ? w + (p + 1) * ps : nullptr);
    }
}

// Panels [p0, p1) of y for M > kDirectRows rows, blocked (see above): each panel block is copied into an aligned
// buffer that every row tile of the block then reads from L1.
void PanelsMany(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t p0, int64_t p1) {
  alignas(64) float buf[kKc * kPanel];
  const int64_t ps = K * kPanel;
  for (int64_t m0 = 0; m0 < M; m0 += kMc) {
    const int64_t mn = std::min(kMc, M - m0);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kn = std::min(kKc, K - k0);
        std::memcpy(buf, w + p * ps + k0 * kPanel, kn * kPanel * sizeof(float));
        const int64_t tiles = (mn + 5) / 6;
        const float* next = k0 + kKc < K ? w + p * ps + (k0 + kKc) * kPanel : p + 1 < p1 ? w + (p + 1) * ps : nullptr;
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t r = m0 + TileStart(t, tiles, mn), r1 = m0 + TileStart(t + 1, tiles, mn);
          PanelRows(r1 - r, x + r * K + k0, K, buf, kn, y + r * N + p * kPanel, N, k0 > 0, t == 0 ? next : nullptr);
        }
      }
    }
  }
}

// Whether the packed kernels' units go out as one contiguous range a thread (RunRanges, 1) or one at a time to
// whichever thread is free (RunUnits, 0): SglJaxMatmulRanges switches it for A/B runs and tests.
std::atomic<int> g_ranges{1};

// fn(p0, p1, pf_end) for the panels [0, P) of a packed product, cut into `units` units of whole `group`s of panels
// (a tile's panels), [p0, p1) one unit's; pf_end is where the thread's range ends, up to which a unit's last tile
// may prefetch the next unit's first weights (the same thread's next unit, unless another thread took it). Each
// output column is computed by the same tile either way, so the results do not depend on the switch.
template <typename F>
void ForPanelUnits(ffi::ThreadPool& pool, int64_t P, int64_t group, int64_t units, F fn) {
  const int64_t groups = (P + group - 1) / group;
  auto at = [=](int64_t u) { return std::min(P, u * groups / units * group); };
  if (g_ranges.load(std::memory_order_relaxed)) {
    RunRanges(pool, units, [=](int64_t u, int64_t end) { fn(at(u), at(u + 1), at(end)); });
  } else {
    RunUnits(pool, units, [=](int64_t u) { fn(at(u), at(u + 1), at(u + 1)); });
  }
}

// y = x @ w with float32 w packed [P, K, 16], N = 16 P.
ffi::Error PackedF32(ffi::ThreadPool& pool, ffi::Span<const int64_t> xd, const float* xp, ffi::Span<const int64_t> wd,
                     const float* wp, float* yp) {
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel)
    return ffi::Error::InvalidArgument("packed matmul: x must be [M, K] and w [N / 16, K, 16]");
  const int64_t M = xd[0], K = xd[1], P = wd[0], N = P * kPanel;
  if (wd[1] != K) return ffi::Error::InvalidArgument("packed matmul: x and w disagree on K");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.0f);
    return ffi::Error::Success();
  }
  auto run = [=](int64_t p0, int64_t p1) {
    if (M <= kDirectRows) {
      PanelsFew(xp, wp, yp, M, K, N, p0, p1);
    } else {
      PanelsMany(xp, wp, yp, M, K, N, p0, p1);
    }
  };
  // Units of whole panel groups (4 panels for one row, 2 for two: PanelsFew's tiles); small products stay on this
  // thread.
  const int64_t group = M == 1 ? 4 : M == 2 ? 2 : 1, groups = (P + group - 1) / group;
  const int64_t units = M * N * K < (1 << 16) ? 1 : std::min<int64_t>(groups, 16);
  ForPanelUnits(pool, P, group, units, [=](int64_t p0, int64_t p1, int64_t) { run(p0, p1); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// int8 panel-packed weights times int8-quantized activations, in integer arithmetic.
//
// Layout: w [P, K / 4, 16, 4], w[p, q, c, j] = W[4q + j, 16p + c] (K a multiple of 4): a panel's 16 columns x 4
// consecutive inputs are 64 contiguous bytes, each column's 4 weights adjacent, so one 32-byte vector holds 8
// columns x 4 inputs, the operand of a 4-term integer dot product per 32-bit lane.
//
// Activations: each row of x is cut into blocks of 32 inputs and each block quantized symmetrically,
//   d = max |x_blk| / 127,   xq = round-to-nearest-even(x * (127 / max |x_blk|))  in [-127, 127]   (0 if the block
//   is all zero; a block holding inf or NaN gets d = NaN, so its row's outputs are NaN, never a finite guess),
// and y[m, n] = scale[n] * sum_blk d[m, blk] * (sum_{k in blk} xq[m, k] * w[k, n]): the inner sums are exact
// int32 (at most 32 x 127 x 127), converted once per block. Error against x @ w: at most d / 2 per input, i.e.
// |y - x @ W * scale| <= scale[n] * sum_blk d_blk / 2 * sum_{k in blk} |w[k, n]| (tests/test_cpu_matmul.py checks
// this and the exact integer result). This is the Q8_0 activation format llama.cpp uses for its CPU dot
// products; the reason here is speed: on AVX2 a 32-byte vector of weights is 4 instructions (sign, u8 x s8
// multiply-add pairs, s16 pairs, add; 2 with AVX-VNNI's dot product), against 12 for widening the same 32 weights
// to float and multiplying.
// SmolLM2 decode steps 1.1-1.75x faster (1-64 rows), prefill 1.3x; the int8 preset's logit error against fp32
// up to 1.5x the weight-only int8 one (tests/test_quant.py states both). 16-bit activations per 128 inputs were tried: weight-only
// accuracy to 0.01, but 6 instructions per 32 weights and a 1-row step only 0.93-1.2x faster than the float
// widening (bench/notes.md, "Integer dot products for int8 weights"). Weights must lie in [-127, 127]
// (sgl_jax.models.quant's range): the sign trick negates a weight.

constexpr int64_t kQuad = 4;     // inputs per 32-bit lane
constexpr int64_t kXBlock = 32;  // inputs per activation scale

#if defined(__AVX512F__) && defined(__AVX512BW__)
// A whole block of 32 inputs as QuantizeRow's loop below quantizes it, in two 16-lane vectors: the same max (exact
// in any order), the same products and the same rounding (the conversion rounds to nearest even, as nearbyint does
// in the default rounding mode), so the same bytes; 10x fewer instructions (a 512-row prefill spent ~0.3 ms of a
// 1 ms product here).
inline void QuantizeBlock32(const float* x, int8_t* xq, float* d) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const __m512 aa = _mm512_abs_ps(a), ab = _mm512_abs_ps(b);
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  // NaN fails the compare and inf exceeds the largest finite float
  if ((_mm512_cmp_ps_mask(aa, big, _CMP_LE_OQ) & _mm512_cmp_ps_mask(ab, big, _CMP_LE_OQ)) != 0xffff) {
    *d = std::numeric_limits<float>::quiet_NaN();
    std::memset(xq, 0, kXBlock);
    return;
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab));
  *d = amax / 127.0f;
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 16),
                   _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
}
#endif

// One row of x quantized: xq[K] and d[ceil(K / 32)] (see above).
void QuantizeRow(const float* x, int64_t K, int8_t* xq, float* d) {
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kXBlock, ++b) {
    const int64_t k1 = std::min(K, k0 + kXBlock);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (k1 - k0 == kXBlock) {
      QuantizeBlock32(x + k0, xq + k0, d + b);
      continue;
    }
#endif
    float amax = 0.0f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      finite = finite && std::isfinite(x[k]);
      amax = std::max(amax, std::fabs(x[k]));
    }
    if (!finite) {
      d[b] = std::numeric_limits<float>::quiet_NaN();
      std::fill(xq + k0, xq + k1, int8_t{0});
      continue;
    }
    d[b] = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t k = k0; k < k1; ++k) xq[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  }
}

#if defined(__AVX2__)
typedef __m256i v8i;
inline v8i ZeroI() { return _mm256_setzero_si256(); }
// acc[c] += sum_j |x_j| * (w[c, j] * sign(x_j)) for the 8 columns of one vector (4 inputs each); x4 holds the 4
// quantized inputs in every lane, xa their absolute values
inline v8i DotQuad(v8i acc, v8i xa, v8i x4, const int8_t* w) {
  const v8i wv = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), x4);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, xa, wv);  // the three steps below in one, the same exact sums
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, xa, wv);
#else
  const v8i pairs = _mm256_maddubs_epi16(xa, wv);  // |pair| <= 2 x 127 x 127 < 2^15: never saturates
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}
inline v8i Bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return _mm256_set1_epi32(v);
}
inline v8i Abs4(v8i x4) { return _mm256_abs_epi8(x4); }
inline v8f ToFloat(v8i v) { return (v8f)_mm256_cvtepi32_ps(v); }
#else
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8i ZeroI() { return v8i{}; }
inline v8i Bcast4(const int8_t* x) {
  v8i v;
  int32_t q;
  std::memcpy(&q, x, sizeof(q));
  for (int l = 0; l < 8; ++l) v[l] = q;
  return v;
}
inline v8i Abs4(v8i x4) { return x4; }  // unused by the portable DotQuad
inline v8i DotQuad(v8i acc, v8i, v8i x4, const int8_t* w) {
  int8_t x[4];
  int32_t q = x4[0];
  std::memcpy(x, &q, sizeof(q));
  for (int l = 0; l < 8; ++l)
    acc[l] += x[0] * w[4 * l] + x[1] * w[4 * l + 1] + x[2] * w[4 * l + 2] + x[3] * w[4 * l + 3];
  return acc;
}
inline v8f ToFloat(v8i v) { return __builtin_convertvector(v, v8f); }
#endif

// y[r0.., 16 NP columns] (+)= x[r0.., k0 .. k0 + kn) @ NP panels, integer inner sums per 32-input block. `xq` and
// `xd` point at the tile's first row (its column 0 and block 0), `wp` at the first panel's quad k0 / 4, `pstride`
// is the distance between panels; k0 is a multiple of 32, kn of 4. `acc_in`: add to y (a later k block);
// `scale` applied on the last k block.
template <int R, int NP>
inline void QuadTile(const int8_t* xq, const float* xd, int64_t ldx, int64_t ldd, int64_t k0, const int8_t* wp,
                     int64_t pstride, int64_t kn, float* y, int64_t ldy, bool acc_in, const float* scale, bool last) {
  v8f acc[R][2 * NP];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NP; ++c) acc[r][c] = acc_in ? LoadF8(y + r * ldy + 8 * c) : v8f{};
  for (int64_t b = 0; b < kn; b += kXBlock) {
    const int64_t quads = std::min(kXBlock, kn - b) / kQuad;
    v8i iacc[R][2 * NP];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 2 * NP; ++c) iacc[r][c] = ZeroI();
    const int8_t* wb = wp + b / kQuad * kPanel * kQuad;
    for (int64_t q = 0; q < quads; ++q) {
      v8i x4[R], xa[R];
      for (int r = 0; r < R; ++r) {
        x4[r] = Bcast4(xq + r * ldx + k0 + b + kQuad * q);
        xa[r] = Abs4(x4[r]);
      }
      for (int p = 0; p < NP; ++p) {
        const int8_t* w = wb + p * pstride + q * kPanel * kQuad;
        for (int r = 0; r < R; ++r) {
          iacc[r][2 * p] = DotQuad(iacc[r][2 * p], xa[r], x4[r], w);
          iacc[r][2 * p + 1] = DotQuad(iacc[r][2 * p + 1], xa[r], x4[r], w + 32);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const v8f d = v8f{} + xd[r * ldd + (k0 + b) / kXBlock];
      for (int c = 0; c < 2 * NP; ++c) acc[r][c] += ToFloat(iacc[r][c]) * d;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NP; ++c) {
      v8f v = acc[r][c];
      if (last && scale) v *= LoadF8(scale + 8 * c);
      std::memcpy(y + r * ldy + 8 * c, &v, sizeof(v));
    }
}

// Quantized activations of M rows: xq [M, K], d [M, ceil(K / 32)], each block's sum of xq [M, ceil(K / 32)] (the
// unsigned-weight dot products' correction: QuadTile512) and d x that sum (the Q4_1 min's term: Q4Tile512) -- the
// last two only where a kernel reads them (QuantizeRows).
struct QuantRows {
  const int8_t* xq;
  const float* d;
  int64_t K, blocks;
  const int32_t* sums;
  const float* xs;
};

// sums[b] = the sum of a row's quantized inputs [32b, min(K, 32b + 32)) (exact: at most 32 x 127)
void BlockSums(const int8_t* xq, int64_t K, int32_t* sums) {
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kXBlock, ++b) {
    int32_t s = 0;
    for (int64_t k = k0; k < std::min(K, k0 + kXBlock); ++k) s += xq[k];
    sums[b] = s;
  }
}

// The M rows of x [M, K] quantized (QuantizeRow) into this thread's buffers, zero rows after them up to `rows`
// (AMX reads whole 16-row tiles); with `sums`, each block's sum of xq, and with `scaled` also d x that sum. The
// buffers are kept between calls (a prefill's rows are ~1 MB, which malloc would map and unmap each call) and
// outlive every unit of the call (RunUnits returns after the last); the int8 and Q4_1 kernels share them.
QuantRows QuantizeRows(xla::ffi::ThreadPool& pool, const float* xp, int64_t M, int64_t K, int64_t rows, bool sums,
                       bool scaled) {  // (scaled needs sums)
  const int64_t blocks = (K + kXBlock - 1) / kXBlock;
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> d_buf, xs_buf;
  thread_local std::vector<int32_t> sum_buf;
  if (xq_buf.size() < static_cast<size_t>(rows * K)) xq_buf.resize(rows * K);
  if (d_buf.size() < static_cast<size_t>(rows * blocks)) d_buf.resize(rows * blocks);
  if (sum_buf.size() < static_cast<size_t>(M * blocks)) sum_buf.resize(M * blocks);
  if (scaled && xs_buf.size() < static_cast<size_t>(M * blocks)) xs_buf.resize(M * blocks);
  int8_t* q = xq_buf.data();
  float *d = d_buf.data(), *xs = scaled ? xs_buf.data() : nullptr;
  int32_t* s = sums ? sum_buf.data() : nullptr;
  std::fill(q + M * K, q + rows * K, int8_t{0});
  std::fill(d + M * blocks, d + rows * blocks, 0.0f);
  const int64_t qunits = M * K < (1 << 16) ? 1 : std::min<int64_t>(M, 16);
  RunUnits(pool, qunits, [=](int64_t u) {
    for (int64_t m = u * M / qunits; m < (u + 1) * M / qunits; ++m) {
      QuantizeRow(xp + m * K, K, q + m * K, d + m * blocks);
      if (s) BlockSums(q + m * K, K, s + m * blocks);
      if (xs)
        for (int64_t b = m * blocks; b < (m + 1) * blocks; ++b) xs[b] = d[b] * static_cast<float>(s[b]);
    }
  });
  return QuantRows{q, d, K, blocks, s, xs};
}

// R (1..4) rows x one panel, R chosen at run time (4 rows: 8 integer accumulators + the rows' inputs in registers)
inline void QuadRows(int64_t R, const QuantRows& x, int64_t r0, int64_t k0, const int8_t* wp, int64_t kn, float* y,
                     int64_t ldy, bool acc_in, const float* scale, bool last) {
  const int8_t* xq = x.xq + r0 * x.K;
  const float* xd = x.d + r0 * x.blocks;
  switch (R) {
    case 1: return QuadTile<1, 1>(xq, xd, x.K, x.blocks, k0, wp, 0, kn, y, ldy, acc_in, scale, last);
    case 2: return QuadTile<2, 1>(xq, xd, x.K, x.blocks, k0, wp, 0, kn, y, ldy, acc_in, scale, last);
    case 3: return QuadTile<3, 1>(xq, xd, x.K, x.blocks, k0, wp, 0, kn, y, ldy, acc_in, scale, last);
    default: return QuadTile<4, 1>(xq, xd, x.K, x.blocks, k0, wp, 0, kn, y, ldy, acc_in, scale, last);
  }
}

// The next weight block a row tile prefetches while it computes (its quad rows from `w`, each panel `pstride`
// apart as in the tile's own block): every `parts`-th quad row from the `part`-th, so the block's row tiles share
// the prefetching out between them and the memory stream runs through the whole block's compute.
struct Ahead {
  const int8_t* w = nullptr;
  int64_t part = 0, parts = 1;
};

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SGL_JAX_WIDE_INT8 1
// With AVX-512 (BW + VNNI) a panel's quad row (16 columns x 4 inputs, 64 bytes) is one 512-bit vector and one
// unsigned x signed dot product per row: the weights are read as w + 128 (a flipped top bit, once per weight
// vector for all R rows) and each block's sum then corrected by 128 x the row's sum of its quantized inputs. The
// int32 sums are exactly the signed ones, so the results are the 256-bit tile's and AMX's bit for bit; the
// earlier sign trick (|x| and a masked negation of the weights, per row and weight vector) made whole SmolLM2
// steps 1.19-1.35x (decode, 8-64 rows) and 1.6-1.9x (prefill) slower on an AVX-512 CPU without AMX (bench/notes.md,
// "GGUF Q4_1 kept in its blocks"). R rows x NP panels. A block's 8 quad rows are unrolled and its prefetches
// (see Ahead) issued after them: with a countdown branch in the loop GCC 12 kept the accumulators rotating through
// register copies and a spill (~35 instructions a quad row of a 4 x 2 tile, against 10 now); products of 4-64 rows
// 1.05-1.33x faster, whole decode steps 1.05-1.10x (bench/notes.md, session 26), and 1.17-1.24x more at 4-16 rows
// with the prefetches into L2.
constexpr bool kWide = true;

template <int R, int NP>
inline void QuadTile512(const int8_t* xq, const float* xd, const int32_t* xs, int64_t ldx, int64_t ldd, int64_t k0,
                        const int8_t* wp, int64_t pstride, int64_t kn, float* y, int64_t ldy, bool acc_in,
                        const float* scale, bool last, Ahead pf = {}) {
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = acc_in ? _mm512_loadu_ps(y + r * ldy + kPanel * p) : _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w ^ 0x80 = w + 128 as an unsigned byte
  for (int64_t b = 0; b < kn; b += kXBlock) {
    const int64_t quads = std::min(kXBlock, kn - b) / kQuad, blk = (k0 + b) / kXBlock;
    __m512i iacc[R][NP];
    for (int r = 0; r < R; ++r) {
      const __m512i c = _mm512_set1_epi32(-128 * xs[r * ldd + blk]);  // sum (w + 128) x - 128 sum x = sum w x
      for (int p = 0; p < NP; ++p) iacc[r][p] = c;
    }
    const int8_t* wb = wp + b / kQuad * kPanel * kQuad;
#pragma GCC unroll 8
    for (int64_t q = 0; q < quads; ++q) {
      const int8_t* xr = xq + k0 + b + kQuad * q;
      for (int p = 0; p < NP; ++p) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(wb + p * pstride + q * kPanel * kQuad), flip);
        for (int r = 0; r < R; ++r) {
          int32_t v;
          std::memcpy(&v, xr + r * ldx, sizeof(v));
          iacc[r][p] = _mm512_dpbusd_epi32(iacc[r][p], w, _mm512_set1_epi32(v));
        }
      }
    }
    // this tile's share of the next block's quad rows (every `parts`-th from the `part`-th), once a block, into L2:
    // into L1 they held the core's few L1 miss buffers while the tile computed (8-16 row steps 1.2x slower)
    if (pf.w)
      for (int64_t g = b / kQuad + (pf.part - b / kQuad % pf.parts + pf.parts) % pf.parts; g < b / kQuad + quads;
           g += pf.parts)
        for (int p = 0; p < NP; ++p)
          _mm_prefetch(reinterpret_cast<const char*>(pf.w + g * kPanel * kQuad + p * pstride), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(xd[r * ldd + blk]);
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][p]), d, acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) {
      __m512 v = acc[r][p];
      if (last && scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + kPanel * p));
      _mm512_storeu_ps(y + r * ldy + kPanel * p, v);
    }
}

// R (1..4) rows x NP (1..2) panels, chosen at run time
template <int R>
inline void QuadTileWideR(int64_t NP, const QuantRows& x, int64_t r0, int64_t k0, const int8_t* wp, int64_t ps,
                          int64_t kn, float* y, int64_t ldy, bool acc_in, const float* scale, bool last,
                          Ahead pf) {
  const int8_t* xq = x.xq + r0 * x.K;
  const float* xd = x.d + r0 * x.blocks;
  const int32_t* xs = x.sums + r0 * x.blocks;
  if (NP == 2) return QuadTile512<R, 2>(xq, xd, xs, x.K, x.blocks, k0, wp, ps, kn, y, ldy, acc_in, scale, last, pf);
  return QuadTile512<R, 1>(xq, xd, xs, x.K, x.blocks, k0, wp, ps, kn, y, ldy, acc_in, scale, last, pf);
}

inline void QuadTileWide(int64_t R, int64_t NP, const QuantRows& x, int64_t r0, int64_t k0, const int8_t* wp,
                         int64_t ps, int64_t kn, float* y, int64_t ldy, bool acc_in, const float* scale, bool last,
                         Ahead pf) {
  switch (R) {
    case 1: return QuadTileWideR<1>(NP, x, r0, k0, wp, ps, kn, y, ldy, acc_in, scale, last, pf);
    case 2: return QuadTileWideR<2>(NP, x, r0, k0, wp, ps, kn, y, ldy, acc_in, scale, last, pf);
    case 3: return QuadTileWideR<3>(NP, x, r0, k0, wp, ps, kn, y, ldy, acc_in, scale, last, pf);
    default: return QuadTileWideR<4>(NP, x, r0, k0, wp, ps, kn, y, ldy, acc_in, scale, last, pf);
  }
}

#else
constexpr bool kWide = false;
#endif

// R (1..4) rows x NP panels at rows [r0, r0 + R), inputs [k0, k0 + kn): 512-bit tiles (NP 1..2) where the CPU has
// them, else 256-bit ones (NP 1)
inline void RowTile(int64_t R, int64_t NP, const QuantRows& x, int64_t r0, int64_t k0, const int8_t* wp, int64_t ps,
                    int64_t kn, float* y, int64_t ldy, bool acc_in, const float* scale, bool last, Ahead pf) {
#if defined(SGL_JAX_WIDE_INT8)
  QuadTileWide(R, NP, x, r0, k0, wp, ps, kn, y, ldy, acc_in, scale, last, pf);
#else
  (void)NP;
  (void)ps;
  (void)pf;
  QuadRows(R, x, r0, k0, wp, kn, y, ldy, acc_in, scale, last);
#endif
}

// One row x 4 panels in one pass over all K
inline void OneRowPass(const QuantRows& x, const int8_t* wp, int64_t ps, float* y, const float* scale) {
#if defined(SGL_JAX_WIDE_INT8)
  QuadTile512<1, 4>(x.xq, x.d, x.sums, x.K, x.blocks, 0, wp, ps, x.K, y, 0, false, scale, true);
#else
  QuadTile<1, 4>(x.xq, x.d, x.K, x.blocks, 0, wp, ps, x.K, y, 0, false, scale, true);
#endif
}

// Inputs per k block of the integer kernels: a panel pair's block is then 24 KB of int8 weights (15 KB of Q4_1),
// which stays in L1 (32 KB and up) while every row tile of the block reads it; 256 (the float32 kernel's kKc)
// re-read and re-wrote y three times as often: SmolLM2's linears 1.05-1.17x slower at 16-512 rows on a Zen 5 CPU
// (bench/bench_q4.py; bench/notes.md, session 16). SmolLM2's K = 576 is then one pass at any row count.
constexpr int64_t kQuadKc = 768;

// Panels [p0, p1) of y: rows in blocks of 96 and inputs in blocks of kQuadKc (one pass for decode's few rows); each
// panel's k block is read from memory once and from L1 by the block's other row tiles. One row takes 4
// panels per pass, two rows 2 (256-bit: more independent accumulators per weight read); then tiles of up to 4 rows
// x RowTile's panels (2 with 512-bit tiles, else 1).
void QuadPanels(const QuantRows& x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t p0,
                int64_t p1, int64_t pf_end) {
  const int64_t K = x.K, ps = K * kPanel;
  int64_t p = p0;
  if (M == 1) {
    for (; p + 4 <= p1; p += 4) OneRowPass(x, w + p * ps, ps, y + p * kPanel, ScaleAt(scale, p * kPanel));
  } else if (M == 2 && !kWide) {
    for (; p + 2 <= p1; p += 2)
      QuadTile<2, 2>(x.xq, x.d, K, x.blocks, 0, w + p * ps, ps, K, y + p * kPanel, N, false,
                     ScaleAt(scale, p * kPanel), true);
  }
  const int64_t kc = M <= kDirectRows ? K : std::min(K, kQuadKc), np_max = kWide ? 2 : 1;
  for (int64_t m0 = 0; m0 < M; m0 += kMc) {
    const int64_t mn = std::min(kMc, M - m0), tiles = (mn + 3) / 4;
    for (int64_t q = p; q < p1; q += np_max)
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kn = std::min(kc, K - k0);
        // the next weight block (this pair's next k block, else the next pair's first), fetched a share by each
        // of the block's last (up to 4) row tiles: the memory stream runs while they compute
        const int8_t* next = k0 + kc < K ? w + q * ps + (k0 + kc) * kPanel
                             : q + np_max < pf_end ? w + (q + np_max) * ps : nullptr;
        const int64_t parts = std::min<int64_t>(tiles, 4);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t r = m0 + TileStart(t, tiles, mn), r1 = m0 + TileStart(t + 1, tiles, mn);
          RowTile(r1 - r, std::min(np_max, p1 - q), x, r, k0, w + q * ps + k0 * kPanel, ps, kn,
                  y + r * N + q * kPanel, N, k0 > 0, ScaleAt(scale, q * kPanel), k0 + kn == K,
                  t >= tiles - parts ? Ahead{next, t - (tiles - parts), parts} : Ahead{});
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The same product on AMX (Intel's tile matrix unit: Sapphire Rapids and later), for calls of kAmxRows rows or
// more with K a multiple of 32. A panel's 8 quad rows (32 inputs x 16 columns, 512 contiguous bytes) are exactly
// the right operand of one tile dot product (TDPBSSD: signed x signed bytes, int32 sums), 16 rows of quantized
// activations x 32 inputs its left operand: one instruction computes a 16 x 16 block's integer sums over one
// activation block, which the vector units then scale by each row's d and add in float32 -- the same exact int32
// sums, converted and added in the same order (fmadd per block, then x scale) as QuadTile512, so the outputs are
// bit-identical to the 512-bit VNNI path (tests/test_cpu_matmul.py compares them). The per-block scaling, not the
// tile unit, bounds the speed: in a one-off test a 64 x 576 x 1536 product ran at ~0.7 TOPS on one core this way
// against ~2.1 with one scale for all of K (bench/notes.md, "AMX for the int8 matmuls"). Four blocks' dot products
// go into four result tiles before their sums are read, so the tile unit works while the vector units scale.
// Linux hands out the tile registers only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once a process); a kernel
// that refuses, a CPU without AMX or SGL_JAX_AMX=0 keeps the VNNI path. Each unit checks the thread's tile
// configuration and loads its own if it differs (other code on XLA's threads may use the tile unit with its own).

constexpr int64_t kAmxRows = 4;  // from this many rows on (bench/notes.md, "AMX for the int8 matmuls")

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(SGL_JAX_WIDE_INT8) && defined(__linux__)
#define SGL_JAX_AMX 1

// -1: not decided yet; 0: off (not available, refused, or switched off); 1: on
std::atomic<int> g_amx{-1};

bool AmxPermitted() {
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // from the kernel's uapi (asm/prctl.h, xstate)
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

bool AmxOn() {
  int v = g_amx.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("SGL_JAX_AMX");
    v = (env && std::strcmp(env, "0") == 0) ? 0 : (AmxPermitted() ? 1 : 0);
    g_amx.store(v);
  }
  return v == 1;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: `rows` x 16 int32 results; 4-5: `rows` x 32 activation bytes; 6-7: 8 quad rows x 64 weight bytes
// (loaded only when the thread's current configuration differs: reading it back is a 64-byte store, loading it
// costs more, and a step makes ~2,000 of these calls)
void AmxConfigure(int rows) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.colsb[t] = 64, c.rows[t] = rows;
  for (int t = 4; t < 6; ++t) c.colsb[t] = kXBlock, c.rows[t] = rows;
  for (int t = 6; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = kXBlock / kQuad;
  TileConfig now;
  _tile_storeconfig(&now);
  if (std::memcmp(&now, &c, sizeof(c)) != 0) _tile_loadconfig(&c);
}

// One block's integer sums into result tile T (activation tile A, weight tile B; T, A, B are immediates)
#define SGL_AMX_BLOCK(T, A, B, xb, wb, ldx) \
  _tile_zero(T);                            \
  _tile_loadd(A, xb, ldx);                  \
  _tile_loadd(B, wb, 64);                   \
  _tile_dpbssd(T, A, B);

// y[0:rows, 0:16] = scale * sum_blk d[r, blk] * (xq[r, blk] . w[blk]) for RP (8 or 16: the configured tile rows)
// activation rows (xq: rows beyond `rows` are padding, read but not stored) and one panel (wp at its quad row 0);
// d [RP, ldd], K % 32 == 0.
template <int RP>
void AmxPanel16(const int8_t* xq, int64_t ldx, const float* d, int64_t ldd, const int8_t* wp, int64_t K,
                const float* scale, float* y, int64_t ldy, int64_t rows) {
  __m512 acc[RP];
  for (int r = 0; r < RP; ++r) acc[r] = _mm512_setzero_ps();
  alignas(64) int32_t sums[4][16 * 16];
  const int64_t blocks = K / kXBlock, wblock = kXBlock / kQuad * kPanel * kQuad;  // 512 weight bytes a block
  for (int64_t b0 = 0; b0 < blocks; b0 += 4) {
    const int64_t nb = std::min<int64_t>(4, blocks - b0);
    const int8_t* xb = xq + b0 * kXBlock;
    const int8_t* wb = wp + b0 * wblock;
    SGL_AMX_BLOCK(0, 4, 6, xb, wb, ldx)
    if (nb > 1) { SGL_AMX_BLOCK(1, 5, 7, xb + kXBlock, wb + wblock, ldx) }
    if (nb > 2) { SGL_AMX_BLOCK(2, 4, 6, xb + 2 * kXBlock, wb + 2 * wblock, ldx) }
    if (nb > 3) { SGL_AMX_BLOCK(3, 5, 7, xb + 3 * kXBlock, wb + 3 * wblock, ldx) }
    _tile_stored(0, sums[0], 64);
    if (nb > 1) _tile_stored(1, sums[1], 64);
    if (nb > 2) _tile_stored(2, sums[2], 64);
    if (nb > 3) _tile_stored(3, sums[3], 64);
    for (int64_t t = 0; t < nb; ++t)
      for (int r = 0; r < RP; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[t] + 16 * r)),
                                 _mm512_set1_ps(d[r * ldd + b0 + t]), acc[r]);
  }
  const __m512 s = scale ? _mm512_loadu_ps(scale) : _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(y + r * ldy, scale ? _mm512_mul_ps(acc[r], s) : acc[r]);
}
#undef SGL_AMX_BLOCK

// Panels [p0, p1) of y for all M rows (x's rows padded with zeros to a multiple of 16)
void AmxPanels(const QuantRows& x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t p0,
               int64_t p1) {
  const bool few = M <= 8;  // one tile of 8 rows (a tile unit's product takes about as long as its rows)
  AmxConfigure(few ? 8 : 16);
  const int64_t K = x.K, ps = K * kPanel;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int64_t rows = std::min<int64_t>(16, M - m0);
      (few ? &AmxPanel16<8> : &AmxPanel16<16>)(x.xq + m0 * K, K, x.d + m0 * x.blocks, x.blocks, w + p * ps,
                                               K, ScaleAt(scale, p * kPanel), y + m0 * N + p * kPanel, N, rows);
    }
}
#else
bool AmxOn() { return false; }
#endif

// y = (x @ w) * scale with w int8 [P, K / 4, 16, 4], N = 16 P (see above).
ffi::Error PackedInt8(ffi::ThreadPool& pool, ffi::Span<const int64_t> xd, const float* xp, ffi::Span<const int64_t> wd,
                      const int8_t* wp, const float* sp, int64_t scale_count, float* yp) {
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != kPanel || wd[3] != kQuad)
    return ffi::Error::InvalidArgument("packed int8 matmul: x must be [M, K] and w [N / 16, K / 4, 16, 4]");
  const int64_t M = xd[0], K = xd[1], P = wd[0], N = P * kPanel;
  if (wd[1] * kQuad != K) return ffi::Error::InvalidArgument("packed int8 matmul: x and w disagree on K");
  if (scale_count != N)
    return ffi::Error::InvalidArgument("packed int8 matmul: scale must have one entry per output column");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const bool amx = M >= kAmxRows && K % kXBlock == 0 && AmxOn();
  // AMX reads whole 16-row tiles (zero rows after the last); only QuadTile512 reads the block sums
  const QuantRows x = QuantizeRows(pool, xp, M, K, amx ? (M + 15) / 16 * 16 : M, kWide && !amx, false);
#if defined(SGL_JAX_AMX)
  if (amx) {
    const int64_t units = std::min<int64_t>(P, 16);
    RunUnits(pool, units, [=](int64_t u) { AmxPanels(x, wp, sp, yp, M, N, u * P / units, (u + 1) * P / units); });
    return ffi::Error::Success();
  }
#endif
  // units of whole panel groups (the tiles' panels); small products stay on this thread
  const int64_t group = M == 1 ? 4 : (M == 2 || kWide) ? 2 : 1, groups = (P + group - 1) / group;
  const int64_t units = M * N * K < (1 << 16) ? 1 : std::min<int64_t>(groups, 16);
  ForPanelUnits(pool, P, group, units, [=](int64_t p0, int64_t p1, int64_t pf_end) {
    QuadPanels(x, wp, sp, yp, M, N, p0, p1, pf_end);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// GGUF Q4_1 weights kept in their block format (sgl_jax.models.packing.pack_q4_1) times int8-quantized activations
// (the Q8 blocks of 32 above), in integer arithmetic.
//
// A Q4_1 block is 32 consecutive inputs of one output column: w[k] = d * q[k] + m, q in [0, 15], d and m float16
// (as the file stores them). Layout: w uint8 [P, K / 32, 320]; for panel p (columns 16p .. 16p+15) and block b:
//   [0, 256)    nibbles: byte 64 i + 4 c + j (i, j < 4, c < 16) = q[32b + 4i + j, c] | q[32b + 16 + 4i + j, c] << 4:
//               64 bytes are two quad rows of the int8 layout above, quad row i in the low nibbles, i + 4 in the high
//   [256, 288)  the 16 columns' d, float16;  [288, 320) their m, float16.
// 0.625 bytes a weight against the int8 layout's 1 (plus a scale a column).
//   y[r, n] = sum_b dx[r, b] * (d[b, n] * sum_k xq[r, k] q[k, n] + m[b, n] * sum_k xq[r, k])
// with exact int32 inner sums (q unsigned and xq signed: VNNI's u8 x s8 dot product as it is, no sign trick), the
// min's term through the block's sum of quantized inputs (xs = dx * sum xq, per row and block). The weights are
// exactly the file's; the activation error is the int8 path's, at most dx / 2 an input. Each output is accumulated
// block by block in the same order (d * dx, then one fma for the sums and one for the min) for any number of rows
// and in every build, so a row's result does not depend on the rows beside it.
constexpr int64_t kQ4Bytes = 320;   // bytes of one (panel, block)
constexpr int64_t kQ4Scales = 256;  // offset of its d (then m at + 32)

inline float HalfBits(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0 && man == 0) bits = sign;
  else if (exp == 0) {  // subnormal: normalize
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while (!(m & 0x400));
    bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
  } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
  else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// The portable tile: R rows x one panel, blocks [b0, b0 + nb) (wp at the panel's block 0, rows' xq / xd / xs at
// their column 0 / block 0)
inline void Q4TileScalar(int64_t R, const int8_t* xq, const float* xd, const float* xs, int64_t ldx, int64_t ldd,
                         int64_t b0, int64_t nb, const uint8_t* wp, float* y, int64_t ldy, bool acc_in) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < kPanel; ++c) {
      float acc = acc_in ? y[r * ldy + c] : 0.0f;
      for (int64_t b = b0; b < b0 + nb; ++b) {
        const uint8_t* wb = wp + b * kQ4Bytes;
        const int8_t* xb = xq + r * ldx + b * kXBlock;
        int32_t s = 0;
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t j = 0; j < 4; ++j) {
            const uint8_t v = wb[64 * i + 4 * c + j];
            s += (v & 15) * xb[4 * i + j] + (v >> 4) * xb[16 + 4 * i + j];
          }
        const float dd = HalfBits(wb + kQ4Scales + 2 * c) * xd[r * ldd + b];
        acc = std::fma(static_cast<float>(s), dd, acc);
        acc = std::fma(HalfBits(wb + kQ4Scales + 32 + 2 * c), xs[r * ldd + b], acc);
      }
      y[r * ldy + c] = acc;
    }
}

#if defined(SGL_JAX_WIDE_INT8) && defined(__F16C__)
#define SGL_JAX_Q4_WIDE 1
// R rows x NP panels with 512-bit vectors (a panel's 16 columns in one): per block, 4 loads of 64 nibble bytes give
// the 8 quad rows (and, shift), each one dot product per row into one accumulator a row and panel (separate ones
// for the low and high nibbles, added per block, were 4-8 % slower at 64-512 rows: bench/bench_q4.py).
template <int R, int NP>
inline void Q4Tile512(const int8_t* xq, const float* xd, const float* xs, int64_t ldx, int64_t ldd, int64_t b0,
                      int64_t nb, const uint8_t* wp, int64_t pstride, float* y, int64_t ldy, bool acc_in,
                      const uint8_t* pf = nullptr) {
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = acc_in ? _mm512_loadu_ps(y + r * ldy + kPanel * p) : _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = b0; b < b0 + nb; ++b) {
    __m512i is[R][NP];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < NP; ++p) is[r][p] = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      __m512i xl[R], xh[R];
      for (int r = 0; r < R; ++r) {
        int32_t a, c;
        std::memcpy(&a, xq + r * ldx + b * kXBlock + 4 * i, sizeof(a));
        std::memcpy(&c, xq + r * ldx + b * kXBlock + 16 + 4 * i, sizeof(c));
        xl[r] = _mm512_set1_epi32(a);
        xh[r] = _mm512_set1_epi32(c);
      }
      for (int p = 0; p < NP; ++p) {
        const __m512i v = _mm512_loadu_si512(wp + p * pstride + b * kQ4Bytes + 64 * i);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          is[r][p] = _mm512_dpbusd_epi32(is[r][p], lo, xl[r]);
          is[r][p] = _mm512_dpbusd_epi32(is[r][p], hi, xh[r]);
        }
        if (pf)  // the next weight block's line i (and its scales' line); into L1 (L2 measured 0.99-1.04x here)
          for (int64_t o = 64 * i; o < (i == 3 ? kQ4Bytes : 64 * i + 64); o += 64)
            _mm_prefetch(reinterpret_cast<const char*>(pf + p * pstride + (b - b0) * kQ4Bytes + o), _MM_HINT_T0);
      }
    }
    for (int p = 0; p < NP; ++p) {
      const uint8_t* sc = wp + p * pstride + b * kQ4Bytes + kQ4Scales;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 32)));
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_cvtepi32_ps(is[r][p]);
        acc[r][p] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(xd[r * ldd + b])), acc[r][p]);
        acc[r][p] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r * ldd + b]), acc[r][p]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(y + r * ldy + kPanel * p, acc[r][p]);
}

template <int R>
inline void Q4TileWideR(int64_t NP, const int8_t* xq, const float* xd, const float* xs, int64_t ldx, int64_t ldd,
                        int64_t b0, int64_t nb, const uint8_t* wp, int64_t ps, float* y, int64_t ldy, bool acc_in,
                        const uint8_t* pf) {
  if constexpr (R == 1)  // (one row only: four panels' accumulators for more rows would not fit the registers)
    if (NP == 4) return Q4Tile512<R, 4>(xq, xd, xs, ldx, ldd, b0, nb, wp, ps, y, ldy, acc_in);
  if (NP == 2) return Q4Tile512<R, 2>(xq, xd, xs, ldx, ldd, b0, nb, wp, ps, y, ldy, acc_in, pf);
  return Q4Tile512<R, 1>(xq, xd, xs, ldx, ldd, b0, nb, wp, ps, y, ldy, acc_in, pf);
}
#elif defined(__AVX2__) && defined(__F16C__)
#define SGL_JAX_Q4_AVX2 1
// R rows x one panel with 256-bit vectors, a half panel (8 columns) at a time: a quad row's 32 bytes of a half are
// multiplied as unsigned x signed byte pairs into 16-bit sums (at most 2 x 15 x 127: no saturation) and those
// summed in pairs into the 32-bit lanes -- the same exact integer sums as the 512-bit tile.
template <int R>
inline void Q4TileAvx2(const int8_t* xq, const float* xd, const float* xs, int64_t ldx, int64_t ldd, int64_t b0,
                       int64_t nb, const uint8_t* wp, float* y, int64_t ldy, bool acc_in) {
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = acc_in ? _mm256_loadu_ps(y + r * ldy + 8 * h) : _mm256_setzero_ps();
    for (int64_t b = b0; b < b0 + nb; ++b) {
      __m256i is[R];
      for (int r = 0; r < R; ++r) is[r] = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + b * kQ4Bytes + 64 * i + 32 * h));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          int32_t a, c;
          std::memcpy(&a, xq + r * ldx + b * kXBlock + 4 * i, sizeof(a));
          std::memcpy(&c, xq + r * ldx + b * kXBlock + 16 + 4 * i, sizeof(c));
          const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a));
          const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(c));
          is[r] = _mm256_add_epi32(is[r], _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones));
        }
      }
      const uint8_t* sc = wp + b * kQ4Bytes + kQ4Scales + 16 * h;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 32)));
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r]), _mm256_mul_ps(d, _mm256_set1_ps(xd[r * ldd + b])), acc[r]);
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[r * ldd + b]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * ldy + 8 * h, acc[r]);
  }
}
#endif

// R (1..4) rows x NP panels at rows [r0, r0 + R), blocks [b0, b0 + nb): wp at the first panel's block 0; `pf`: the
// next weight block to prefetch meanwhile (512-bit tiles; nullptr: none)
inline void Q4RowTile(int64_t R, int64_t NP, const QuantRows& x, int64_t r0, int64_t b0, int64_t nb, const uint8_t* wp,
                      int64_t ps, float* y, int64_t ldy, bool acc_in, const uint8_t* pf = nullptr) {
  const int8_t* xq = x.xq + r0 * x.K;
  const float* xd = x.d + r0 * x.blocks;
  const float* xs = x.xs + r0 * x.blocks;
  const int64_t ldx = x.K, ldd = x.blocks;
#if defined(SGL_JAX_Q4_WIDE)
  switch (R) {
    case 1: return Q4TileWideR<1>(NP, xq, xd, xs, ldx, ldd, b0, nb, wp, ps, y, ldy, acc_in, pf);
    case 2: return Q4TileWideR<2>(NP, xq, xd, xs, ldx, ldd, b0, nb, wp, ps, y, ldy, acc_in, pf);
    case 3: return Q4TileWideR<3>(NP, xq, xd, xs, ldx, ldd, b0, nb, wp, ps, y, ldy, acc_in, pf);
    default: return Q4TileWideR<4>(NP, xq, xd, xs, ldx, ldd, b0, nb, wp, ps, y, ldy, acc_in, pf);
  }
#else
  (void)pf;
  for (int64_t p = 0; p < NP; ++p) {
    const uint8_t* w = wp + p * ps;
    float* yp = y + p * kPanel;
#if defined(SGL_JAX_Q4_AVX2)
    switch (R) {
      case 1: Q4TileAvx2<1>(xq, xd, xs, ldx, ldd, b0, nb, w, yp, ldy, acc_in); break;
      case 2: Q4TileAvx2<2>(xq, xd, xs, ldx, ldd, b0, nb, w, yp, ldy, acc_in); break;
      case 3: Q4TileAvx2<3>(xq, xd, xs, ldx, ldd, b0, nb, w, yp, ldy, acc_in); break;
      default: Q4TileAvx2<4>(xq, xd, xs, ldx, ldd, b0, nb, w, yp, ldy, acc_in); break;
    }
#else
    Q4TileScalar(R, xq, xd, xs, ldx, ldd, b0, nb, w, yp, ldy, acc_in);
#endif
  }
#endif
}

// Panels [p0, p1) of y, as QuadPanels cuts them: one row takes 4 panels per pass over all K, more rows blocks of
// 96 rows x kQuadKc inputs (one pass up to 8 rows) in tiles of up to 4 rows x 2 panels.
void Q4Panels(const QuantRows& x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t p0, int64_t p1,
              int64_t pf_end) {
  const int64_t blocks = x.blocks, ps = blocks * kQ4Bytes;
  int64_t p = p0;
  if (M == 1)
    for (; p + 4 <= p1; p += 4) Q4RowTile(1, 4, x, 0, 0, blocks, w + p * ps, ps, y + p * kPanel, N, false);
  const int64_t kb = M <= kDirectRows ? blocks : kQuadKc / kXBlock;
  for (int64_t m0 = 0; m0 < M; m0 += kMc) {
    const int64_t mn = std::min(kMc, M - m0), tiles = (mn + 3) / 4;
    for (int64_t q = p; q < p1; q += 2)
      for (int64_t b0 = 0; b0 < blocks; b0 += kb) {
        const int64_t nb = std::min(kb, blocks - b0);
        const uint8_t* next = b0 + kb < blocks ? w + q * ps + (b0 + kb) * kQ4Bytes
                              : q + 2 < pf_end ? w + (q + 2) * ps : nullptr;
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t r = m0 + TileStart(t, tiles, mn), r1 = m0 + TileStart(t + 1, tiles, mn);
          Q4RowTile(r1 - r, std::min<int64_t>(2, p1 - q), x, r, b0, nb, w + q * ps, ps, y + r * N + q * kPanel, N,
                    b0 > 0, t == tiles - 1 ? next : nullptr);
        }
      }
  }
}

// y = x @ W with W's Q4_1 blocks packed [P, K / 32, 320], N = 16 P (see above).
ffi::Error PackedQ4(ffi::ThreadPool& pool, ffi::Span<const int64_t> xd, const float* xp, ffi::Span<const int64_t> wd,
                    const uint8_t* wp, float* yp) {
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kQ4Bytes)
    return ffi::Error::InvalidArgument("packed Q4_1 matmul: x must be [M, K] and w [N / 16, K / 32, 320]");
  const int64_t M = xd[0], K = xd[1], P = wd[0], N = P * kPanel, blocks = wd[1];
  if (blocks * kXBlock != K) return ffi::Error::InvalidArgument("packed Q4_1 matmul: x and w disagree on K");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const QuantRows x = QuantizeRows(pool, xp, M, K, M, true, true);
  const int64_t group = M == 1 ? 4 : 2, groups = (P + group - 1) / group;
  const int64_t units = M * N * K < (1 << 16) ? 1 : std::min<int64_t>(groups, 16);
  ForPanelUnits(pool, P, group, units, [=](int64_t p0, int64_t p1, int64_t pf_end) {
    Q4Panels(x, wp, yp, M, N, p0, p1, pf_end);
  });
  return ffi::Error::Success();
}

// The packed kernels' operand `keep` (s32 [M]): only x's rows with keep != 0 are multiplied, y's other rows are
// zeros. A step's padding rows (a decode bucket's spare rows, each prefill chunk's last block past the chunk) cost a
// real row's compute otherwise (bench/notes.md, session 15). Kept rows that are x's first rows are computed in place;
// others are gathered into a buffer of their own, multiplied, and put back -- each kept row's result is then the
// same, bit for bit, as the product of the kept rows alone. `inner(dims, x, y)` is the kernel on [rows, K].
template <typename F>
ffi::Error OnKeptRows(ffi::Span<const int64_t> xd, const float* xp, const ffi::Buffer<ffi::S32>& keep, int64_t n,
                      float* yp, F inner) {
  if (xd.size() != 2) return inner(xd, xp, yp);  // the kernel names the bad shape
  const int64_t M = xd[0], K = xd[1];
  if (static_cast<int64_t>(keep.element_count()) != M)
    return ffi::Error::InvalidArgument("packed matmul: keep must have one entry per row of x");
  const int32_t* kp = keep.typed_data();
  int64_t m = 0;
  bool leading = true;
  for (int64_t i = 0; i < M; ++i)
    if (kp[i] != 0) leading &= i == m++;
  const int64_t dims[2] = {m, K};
  const ffi::Span<const int64_t> d(dims, 2);
  if (leading) {
    ffi::Error e = inner(d, xp, yp);
    if (e.success()) std::fill(yp + m * n, yp + M * n, 0.0f);
    return e;
  }
  thread_local std::vector<float> xs, ys;
  xs.resize(m * K);
  ys.resize(m * n);
  for (int64_t i = 0, j = 0; i < M; ++i)
    if (kp[i] != 0) std::copy(xp + i * K, xp + (i + 1) * K, xs.data() + j++ * K);
  ffi::Error e = inner(d, xs.data(), ys.data());
  if (!e.success()) return e;
  for (int64_t i = 0, j = 0; i < M; ++i) {
    if (kp[i] != 0) {
      std::copy(ys.data() + j * n, ys.data() + (j + 1) * n, yp + i * n);
      ++j;
    } else {
      std::fill(yp + i * n, yp + (i + 1) * n, 0.0f);
    }
  }
  return e;
}

int64_t OutColumns(ffi::Span<const int64_t> wd) { return wd.size() >= 1 ? wd[0] * kPanel : 0; }

ffi::Error PackedQ4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                        ffi::Buffer<ffi::S32> keep, ffi::ResultBuffer<ffi::F32> y) {
  return OnKeptRows(x.dimensions(), x.typed_data(), keep, OutColumns(w.dimensions()), y->typed_data(),
                    [&](ffi::Span<const int64_t> xd, const float* xp, float* yp) {
                      return PackedQ4(pool, xd, xp, w.dimensions(), w.typed_data(), yp);
                    });
}

ffi::Error PackedInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> keep, ffi::ResultBuffer<ffi::F32> y) {
  return OnKeptRows(x.dimensions(), x.typed_data(), keep, OutColumns(w.dimensions()), y->typed_data(),
                    [&](ffi::Span<const int64_t> xd, const float* xp, float* yp) {
                      return PackedInt8(pool, xd, xp, w.dimensions(), w.typed_data(), scale.typed_data(),
                                        static_cast<int64_t>(scale.element_count()), yp);
                    });
}

ffi::Error PackedF32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> keep, ffi::ResultBuffer<ffi::F32> y) {
  return OnKeptRows(x.dimensions(), x.typed_data(), keep, OutColumns(w.dimensions()), y->typed_data(),
                    [&](ffi::Span<const int64_t> xd, const float* xp, float* yp) {
                      return PackedF32(pool, xd, xp, w.dimensions(), w.typed_data(), yp);
                    });
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SglJaxPackedInt8Matmul, PackedInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SglJaxPackedQ4Matmul, PackedQ4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SglJaxPackedF32Matmul, PackedF32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether the packed kernels give each thread a contiguous range of their units (1) or hand them out one at a time
// (0), after `set`: -1 leaves it, 0 or 1 sets it (for A/B runs and tests: pallas_kernels/cpu_matmul.py).
extern "C" int SglJaxMatmulRanges(int set) {
  if (set == 0 || set == 1) g_ranges.store(set);
  return g_ranges.load();
}

// RunRangesOn under test: `trials` runs of `units` units on `lanes` threads (std::thread), each unit sleeping or
// yielding at random; returns the number of units that ran other than exactly once, or with an `end` other than
// their range's (0: correct). For tests/test_cpu_matmul.py.
extern "C" int64_t SglJaxRangesSelfTest(int64_t units, int64_t lanes, int64_t trials) {
  int64_t bad = 0;
  for (int64_t t = 0; t < trials; ++t) {
    std::vector<std::atomic<int>> runs(units);
    std::vector<std::atomic<int>> wrong_end(units);
    std::vector<std::thread> threads;
    std::atomic<uint64_t> seed{static_cast<uint64_t>(t) * 0x9E3779B97F4A7C15ull + 1};
    const int64_t l = std::max<int64_t>(1, std::min(lanes, units));
    RunRangesOn(
        lanes, [&threads](auto task) { threads.emplace_back(task); }, units,
        [&](int64_t u, int64_t end) {
          int64_t k = 0;  // the range holding u: [k units / l, (k + 1) units / l)
          while (u >= (k + 1) * units / l) ++k;
          if (end != (k + 1) * units / l) wrong_end[u].fetch_add(1);
          const uint64_t r = seed.fetch_add(0x9E3779B97F4A7C15ull) >> 59;
          if (r < 4) std::this_thread::sleep_for(std::chrono::microseconds(r * 20));
          else if (r < 16) std::this_thread::yield();
          runs[u].fetch_add(1);
        });
    for (auto& th : threads) th.join();
    for (int64_t u = 0; u < units; ++u) bad += runs[u].load() != 1 || wrong_end[u].load() != 0;
  }
  return bad;
}

// Whether the int8 packed matmul uses AMX (1) or the VNNI tiles (0), after `set`: -1 leaves it, 0 switches AMX off,
// 1 on where the CPU, the build and the OS allow it (for A/B runs and tests: pallas_kernels/cpu_matmul.py).
extern "C" int SglJaxAmxInt8(int set) {
#if defined(SGL_JAX_AMX)
  if (set == 0) g_amx.store(0);
  if (set == 1) g_amx.store(AmxPermitted() ? 1 : 0);
#else
  (void)set;
#endif
  return AmxOn() ? 1 : 0;
}
