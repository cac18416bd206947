// Paged attention for the CPU backend, as an XLA FFI custom call (pallas_kernels/cpu_attention.py builds and
// registers it). The same function as sgl_jax.models.attention.paged_attention:
//
//   q [R, Bq, H, D] f32, k_pages / v_pages [N, KV, S, D] f32, page_table [R, P] s32, kv_lens [R] s32,
//   q_positions [R, Bq] s32 (-1 = padding)  ->  out [R, Bq, H, D] f32
//
// The query at position t of row r sees keys j with j <= t, j < kv_lens[r] (and j > t - window when a window
// is set); key j lives in slot j % S of page page_table[r, j / S]. A query that sees nothing gives zeros.
//
// Why a kernel: XLA:CPU runs the jnp forms as gathers that copy every row's pages (or a loop of them), so a
// decode step at 64 rows x 700 tokens spent ~1 s in attention where reading the keys and values once takes
// ~50 ms (bench/notes.md, "Native paged attention on CPU"). Here each (row, KV head) is one unit of work: it
// walks the pages its queries see, in place, with an online softmax (running max and sum per query), and
// reads only the visible keys of each page -- so slots past a row's length, which may hold stale or
// non-finite data, are never read, and no mask value ever meets a value row. The G = H / KV query heads
// that share a KV head are scored together, so each key and value row is loaded once per unit.
// Inner loops: keys are scored 8 at a time with one transpose-add, and the value accumulation keeps the output
// vectors in registers (D = 32, 64, 128) so its chains run side by side (bench/notes.md, "Tuning the attention
// kernel").
//
// Units are claimed from a shared counter by the calling thread and by helpers on XLA's intra-op pool
// (cpu_native.h, RunUnits).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_native.h"  // includes xla/ffi/api/ffi.h

namespace ffi = xla::ffi;

namespace {

using sgl_jax_native::RunUnits;

typedef float v8f __attribute__((vector_size(32)));

inline v8f LoadF8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreF8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

inline float HSum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp of eight lanes. With AVX2: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in two parts, p a degree-6
// polynomial (relative error ~2e-7, below float32 rounding of the sums it feeds); inputs are <= 0 here
// (scores minus their running max), clamped at -87 where exp is below float32's normal range and the
// probability is as good as 0 beside the running max's 1. Without AVX2, std::exp lane by lane.
inline v8f Exp8(v8f x) {
#if defined(__AVX2__)
  __m256 v = _mm256_max_ps((__m256)x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
  v = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), v);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(v, v), _mm256_add_ps(v, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return (v8f)_mm256_mul_ps(p, _mm256_castsi256_ps(e));
#else
  v8f y;
  for (int i = 0; i < 8; ++i) y[i] = std::exp(x[i]);
  return y;
#endif
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* table;
  const int32_t* lens;
  const int32_t* pos;
  float* out;
  int64_t R, Bq, H, D, N, KV, S, P, G;
  float sm_scale;
  int64_t window;  // 0: none
  float soft_cap;  // 0: none
};

// Per-thread scratch for one unit: running max, sum and output of each query of the row (index b * H + head),
// and one page's scores for one query (S rounded up to whole vectors).
// One per thread (thread_local below), fitted to each call's problem.
struct Scratch {
  std::vector<float> m, l, acc, s;
  void Fit(const Problem& p) {
    m.resize(p.Bq * p.H);
    l.resize(p.Bq * p.H);
    acc.resize(p.Bq * p.H * p.D);
    s.resize((p.S + 7) / 8 * 8);
  }
};

inline float Dot(const float* a, const float* b, int64_t D) {
  const int64_t d8 = D / 8 * 8;
  v8f acc0 = v8f{}, acc1 = v8f{};
  int64_t d = 0;
  for (; d + 16 <= d8; d += 16) {
    acc0 += LoadF8(a + d) * LoadF8(b + d);
    acc1 += LoadF8(a + d + 8) * LoadF8(b + d + 8);
  }
  for (; d < d8; d += 8) acc0 += LoadF8(a + d) * LoadF8(b + d);
  float s = HSum(acc0 + acc1);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

#if defined(__AVX2__)
// The dot products of q with 8 consecutive key rows (D apart, D a multiple of 8), as one vector: eight 8-lane
// partial sums reduced together by a transpose-add (7 shuffles and adds for 8 results, not a horizontal sum each).
inline v8f Dots8(const float* q, const float* k, int64_t D) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i * D + d), a[i]);
  }
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// s[0:n] = q . key rows [0, n) (rows D apart)
inline void Scores(const float* q, const float* k, int64_t n, int64_t D, float* s) {
  int64_t j = 0;
#if defined(__AVX2__)
  if (D % 8 == 0)
    for (; j + 8 <= n; j += 8) StoreF8(s + j, Dots8(q, k + j * D, D));
#endif
  for (; j < n; ++j) s[j] = Dot(q, k + j * D, D);
}

// Accumulate for D = 8 * C: the C output vectors stay in registers while the value rows stream by, so the C
// accumulation chains run side by side (one chain over the keys would wait on each add's latency).
template <int C>
inline void AccumulateRegs(float* acc, float corr, const float* p, const float* vrows, int64_t n) {
  v8f a[C];
  for (int c = 0; c < C; ++c) a[c] = LoadF8(acc + 8 * c) * corr;
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    for (int c = 0; c < C; ++c) a[c] += pj * LoadF8(vrows + j * 8 * C + 8 * c);
  }
  for (int c = 0; c < C; ++c) StoreF8(acc + 8 * c, a[c]);
}

// acc[0:D] = acc * corr + sum_j p[j] * vrows[j]   (j < n, rows D apart)
inline void Accumulate(float* acc, float corr, const float* p, const float* vrows, int64_t n, int64_t D) {
  if (D == 64) return AccumulateRegs<8>(acc, corr, p, vrows, n);
  if (D == 128) return AccumulateRegs<16>(acc, corr, p, vrows, n);
  if (D == 32) return AccumulateRegs<4>(acc, corr, p, vrows, n);
  const int64_t d8 = D / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    v8f a = LoadF8(acc + d) * corr;
    for (int64_t j = 0; j < n; ++j) a += p[j] * LoadF8(vrows + j * D + d);
    StoreF8(acc + d, a);
  }
  for (int64_t d = d8; d < D; ++d) {
    float a = acc[d] * corr;
    for (int64_t j = 0; j < n; ++j) a += p[j] * vrows[j * D + d];
    acc[d] = a;
  }
}

// Row r, KV heads [h0, h1). Returns false when a page index is outside the pool (nothing is read from it). The
// heads are visited inside the page loop: a page's blocks for consecutive heads are adjacent in the pool, so a
// unit of several heads reads each page's keys (and values) as one run of memory rather than one 4 KB block per
// pass over the row.
bool Unit(const Problem& p, int64_t r, int64_t h0, int64_t h1, Scratch& sc) {
  const int64_t D = p.D, S = p.S, G = p.G;
  const int32_t len = p.lens[r];
  for (int64_t b = 0; b < p.Bq; ++b) {
    const int64_t q0 = b * p.H + h0 * G, q1 = b * p.H + h1 * G;
    std::fill(sc.m.begin() + q0, sc.m.begin() + q1, -std::numeric_limits<float>::infinity());
    std::fill(sc.l.begin() + q0, sc.l.begin() + q1, 0.0f);
    std::fill(sc.acc.begin() + q0 * D, sc.acc.begin() + q1 * D, 0.0f);
  }
  // the keys any query of the row sees: [lo, hi]
  int64_t hi = -1, lo = std::numeric_limits<int64_t>::max();
  for (int64_t b = 0; b < p.Bq; ++b) {
    const int64_t t = p.pos[r * p.Bq + b];
    if (t < 0) continue;
    hi = std::max<int64_t>(hi, std::min<int64_t>(t, int64_t{len} - 1));
    lo = std::min<int64_t>(lo, p.window > 0 ? std::max<int64_t>(0, t - p.window + 1) : 0);
  }
  bool ok = true;
  if (hi >= 0 && lo <= hi) {
    const int64_t c_end = std::min<int64_t>(hi / S, p.P - 1);
    for (int64_t c = lo / S; c <= c_end; ++c) {
      const int64_t page = p.table[r * p.P + c];
      if (page < 0 || page >= p.N) {
        ok = false;
        break;
      }
      const int64_t j0 = c * S;
      for (int64_t h = h0; h < h1; ++h) {
        const float* kb = p.k + (page * p.KV + h) * S * D;
        const float* vb = p.v + (page * p.KV + h) * S * D;
        for (int64_t b = 0; b < p.Bq; ++b) {
          const int64_t t = p.pos[r * p.Bq + b];
          if (t < 0) continue;
          // this query's visible keys in the page: [a, e)
          const int64_t first = p.window > 0 ? std::max<int64_t>(0, t - p.window + 1) : 0;
          const int64_t a = std::max(j0, first);
          const int64_t e = std::min<int64_t>({j0 + S, t + 1, int64_t{len}});
          if (a >= e) continue;
          const int64_t n = e - a;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t qi = b * p.H + h * G + g;
            const float* qv = p.q + ((r * p.Bq + b) * p.H + h * G + g) * D;
            float* s = sc.s.data();
            float mx = sc.m[qi];
            Scores(qv, kb + (a - j0) * D, n, D, s);
            for (int64_t j = 0; j < n; ++j) {
              float x = s[j] * p.sm_scale;
              if (p.soft_cap > 0.0f) x = p.soft_cap * std::tanh(x / p.soft_cap);
              s[j] = x;
              mx = std::max(mx, x);
            }
            for (int64_t j = 0; j < n; j += 8) StoreF8(s + j, Exp8(LoadF8(s + j) - mx));
            float sum = 0.0f;
            for (int64_t j = 0; j < n; ++j) sum += s[j];
            const float corr = std::exp(sc.m[qi] - mx);  // exp(-inf) = 0 at the first visible page
            sc.l[qi] = sc.l[qi] * corr + sum;
            sc.m[qi] = mx;
            Accumulate(sc.acc.data() + qi * D, corr, s, vb + (a - j0) * D, n, D);
          }
        }
      }
    }
  }
  for (int64_t b = 0; b < p.Bq; ++b)
    for (int64_t qh = h0 * G; qh < h1 * G; ++qh) {
      const int64_t qi = b * p.H + qh;
      float* o = p.out + ((r * p.Bq + b) * p.H + qh) * D;
      const float inv = sc.l[qi] > 0.0f ? 1.0f / sc.l[qi] : 0.0f;
      for (int64_t d = 0; d < D; ++d) o[d] = sc.acc[qi * D + d] * inv;
    }
  return ok;
}

constexpr int64_t kRowUnits = 8;  // from this many rows on, a unit is a whole row (all its KV heads)

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lens,
                              ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                              int64_t window, float soft_cap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = table.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument("paged attention: q and pages must be 4-D, v like k, the table 2-D");
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), table.typed_data(), lens.typed_data(),
            pos.typed_data(), out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], kd[2], td[1], 0,
            sm_scale, window, soft_cap};
  if (kd[3] != p.D || p.KV == 0 || p.H % p.KV != 0 || td[0] != p.R ||
      static_cast<int64_t>(lens.element_count()) != p.R ||
      static_cast<int64_t>(pos.element_count()) != p.R * p.Bq)
    return ffi::Error::InvalidArgument("paged attention: operand shapes disagree");
  p.G = p.H / p.KV;
  // a unit: all of a row's KV heads when there are rows enough to share out, else one (row, KV head)
  const int64_t heads = p.R >= kRowUnits ? p.KV : 1, per_row = p.KV / heads;
  std::atomic<bool> bad_page{false};
  RunUnits(pool, p.R * per_row, [p, heads, per_row, &bad_page](int64_t u) {
    thread_local Scratch sc;
    sc.Fit(p);
    const int64_t r = u / per_row, h0 = u % per_row * heads;
    if (!Unit(p, r, h0, h0 + heads, sc)) bad_page.store(true);
  });
  if (bad_page.load()) return ffi::Error::InvalidArgument("paged attention: a page index is outside the pool");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SglJaxPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("soft_cap"));
