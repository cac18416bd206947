// Paged attention for the CPU backend, as an XLA FFI custom call (pallas_kernels/cpu_attention.py builds and
// registers it). The same function as sgl_jax.models.attention.paged_attention:
//
//   q [R, Bq, H, D] f32, k_pages / v_pages [N, KV, S, D] f32, f16, bf16, f8e4m3fn or f8e5m2 (both the same),
//   page_table [R, P] s32, kv_lens [R] s32, q_positions [R, Bq] s32 (-1 = padding)  ->  out [R, Bq, H, D] f32
//
// 16-bit and 8-bit pages are widened to float32 as they are loaded (F16C's convert, a 16-bit shift for bf16, a byte
// moved into float16's fields for fp8: E5M2Pages, E4M3Pages) and all arithmetic stays float32: a 16-bit pool halves
// the bytes a decode step reads, which is what a batched decode step at long context waits on (bench/notes.md, "A
// float16 KV pool on CPU"), and an fp8 pool halves them again.
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
// that share a KV head are computed together (PageShared, with AVX2 for G = 2..4 and D = 32, 64, 128): each key
// and value vector is loaded and widened once into registers for all G, against G times from L1 before (1.2x
// per layer with float16 pages; bench/notes.md, "A float16 KV pool on CPU"); other shapes take PageEach, one
// query at a time. Keys are scored a few at a time with their partial sums reduced by transpose-adds; the value
// accumulation keeps the output vectors in registers so its chains run side by side (bench/notes.md, "Tuning the
// attention kernel"). The next page's key and value blocks are prefetched while one page is computed (the pool
// is far larger than the caches and pages are scattered in it: 1.05-1.3x per layer); a decode row's a few lines at
// a time inside the loops that compute the page (below ScoresShared16: 1.2-1.7x its attention).
//
// With AVX2 a decode row (one query per row), unless its scores would pass g_two_pass_max, takes two passes over
// its pages instead of the online softmax (RowTwoPass): every score first, one softmax per query, then the values.
// In 16-lane loops with AVX-512: 1.3-1.6x per layer at SmolLM2's heads, 1.11-1.24x whole decode steps of 6-64 rows
// on a Zen 5 CPU (bench/notes.md, "Decode attention in 16 lanes and two passes"); in the 8-lane shared loops with
// AVX2 only: 1.3-1.9x per layer, 1.03-1.25x whole decode steps of 1-64 rows on a Zen 3 CPU (bench/notes.md,
// session 36). Fewer than 8 decode rows are split along their keys (DecodeSplits, RunSplit) so that the threads
// share them evenly. Block rows stay online where there is no BlockPage: two passes a query measured 0.87-1.11x.
//
// Block rows (a prefill chunk's queries) take another path for a page that several of them see, with AVX-512:
// BlockPage widens the page once and scores 16 keys per multiply-add for all of them (below). That path is bound
// by the float32 multiply-adds themselves (a Zen 5 core issued them at its peak rate in a profile); with the `bf16`
// attribute and AVX512-BF16, BlockPageB rounds q, k, p and v to bfloat16 and takes each dot product two products
// an instruction (VDPBF16PS, float32 sums): the block rows' attention 1.6-1.75x faster, each output within a
// bfloat16 rounding of its inputs (tests/test_cpu_attention.py; bench/notes.md, "Prefill attention in bfloat16
// pairs"). Decode rows stay float32, except that with the `bf16` attribute the whole pages several decode rows share
// (a fork's branches over one prompt) are computed once for all their queries in bfloat16 pairs, and so are the
// whole pages before a block row's first query (a prompt's cached prefix) for all the block's queries (RunShared,
// SharedPieceB: each page widened once, two passes as RowTwoPass, a query pair's product serving 16 keys, the
// values accumulated in registers over the pages); the rest as above; the partial softmax states merged:
// 1.1-1.5x the attention of 3-64 decode rows over one prompt, 1.2-2.2x a prefill chunk's after a cached prefix
// (bench/notes.md, "Shared pages computed once").
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

// A pool page's next lines fetched into L2, not L1: the L1 prefetches held the core's few L1 miss buffers while the
// page before was computed (whole steps 1.03-1.20x faster, 64 decode rows over their own 512 keys the most:
// bench/notes.md, session 26).
inline void PrefetchL2(const void* a) { __builtin_prefetch(a, 0, 2); }  // locality 2: prefetcht1 on x86

// How far ahead a decode row's two passes fetch (RowTwoPass): one page of a whole row's three KV heads of float16
// (6 KB); a unit of one KV head (fewer than 8 rows) three of its pages: 1 to 4 rows 1.2-1.6x faster than one page
// ahead, 16-64 rows the same (bench/notes.md, session 28).
constexpr int64_t kPrefetchAhead = 6144;

using sgl_jax_native::RunUnits;

typedef float v8f __attribute__((vector_size(32)));

inline v8f LoadF8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreF8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// How a page's elements are read: Load8 widens 8 consecutive elements to float32 lanes, Load1 one element.
struct F32Pages {
  using T = float;
  static v8f Load8(const T* p) { return LoadF8(p); }
  static float Load1(const T* p) { return *p; }
#if defined(__AVX512F__)
  static __m512 Load16(const T* p) { return _mm512_loadu_ps(p); }  // 16 elements as float32 lanes
#endif
};

inline float HalfToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  // IEEE binary16: sign, 5 exponent bits (bias 15), 10 mantissa bits; subnormals scaled exactly
  const uint32_t sign = uint32_t{h & 0x8000u} << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 31 ? (0xffu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// A page type's eight elements widened one at a time: the vector loads' fallback where their instructions are absent
template <typename E>
inline v8f Load8Each(const typename E::T* p) {
  v8f y;
  for (int i = 0; i < 8; ++i) y[i] = E::Load1(p + i);
  return y;
}

struct F16Pages {
  using T = uint16_t;
  static v8f Load8(const T* p) {
#if defined(__F16C__)
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    return Load8Each<F16Pages>(p);
#endif
  }
  static float Load1(const T* p) { return HalfToFloat(*p); }
#if defined(__AVX512F__)
  static __m512 Load16(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif
};

struct BF16Pages {  // bfloat16 is float32's upper half: widening is a 16-bit shift
  using T = uint16_t;
  static v8f Load8(const T* p) {
#if defined(__AVX2__)
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (v8f)_mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#else
    return Load8Each<BF16Pages>(p);
#endif
  }
  static float Load1(const T* p) {
    const uint32_t bits = uint32_t{*p} << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
#if defined(__AVX512F__)
  static __m512 Load16(const T* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
#endif
};

// float8 pages (a quarter of float32's bytes: what a long-context decode step waits on is the pool's reads), widened
// exactly. e5m2 is float16's upper byte: an 8-bit shift, then F16C's convert. e4m3fn (OCP FP8 "fn": no infinities,
// s 1111 111 is NaN) moves its 4-bit exponent and 3-bit mantissa into float16's fields unbiased -- s eeee mmm becomes
// s 0eeee mmm0000000, the value times 2^-8 as float16, subnormals included -- the NaN code becomes a float16 NaN, and
// the float32 result is scaled by 2^8. No per-page scales: the pool stores values as they are, as vLLM's and
// SGLang's unscaled fp8 KV caches do (the model's write clamps to the format's range: models/attention.py to_pool).
constexpr float kE4M3Scale = 256.0f;

inline uint16_t E4M3ToHalfBits(uint8_t b) {  // the float16 bits of b's value times 2^-8 (a NaN for the NaN code)
  const uint16_t w = b, h = static_cast<uint16_t>((w & 0x80u) << 8 | (w & 0x7fu) << 7);
  return (w & 0x7fu) == 0x7fu ? static_cast<uint16_t>(h | 0x7e00u) : h;
}

struct E5M2Pages {
  using T = uint8_t;
  static float Load1(const T* p) { return HalfToFloat(static_cast<uint16_t>(uint16_t{*p} << 8)); }
  static v8f Load8(const T* p) {
#if defined(__F16C__) && defined(__AVX2__)
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return (v8f)_mm256_cvtph_ps(_mm_slli_epi16(w, 8));
#else
    return Load8Each<E5M2Pages>(p);
#endif
  }
#if defined(__AVX512F__)
  static __m512 Load16(const T* p) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtph_ps(_mm256_slli_epi16(w, 8));
  }
#endif
};

struct E4M3Pages {
  using T = uint8_t;
  static float Load1(const T* p) { return HalfToFloat(E4M3ToHalfBits(*p)) * kE4M3Scale; }
  // With the byte sign-extended to 16 bits, a shift by 7 puts s eeee mmm in place (bits 15, 13-10, 9-7) and leaves
  // a copy of s at bit 14, which the mask clears: 3 integer steps, then 3 more make the NaN code's bits a float16 NaN
  static v8f Load8(const T* p) {
#if defined(__F16C__) && defined(__AVX2__)
    const __m128i b = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i h = _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(int16_t(0xbf80)));
    const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)), _mm_set1_epi16(0x3f80));
    return (v8f)_mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7e00)))),
                              _mm256_set1_ps(kE4M3Scale));
#else
    return Load8Each<E4M3Pages>(p);
#endif
  }
#if defined(__AVX512F__)
  static __m512 Load16(const T* p) {
    const __m256i h = _mm256_and_si256(
        _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 7),
        _mm256_set1_epi16(int16_t(0xbf80)));
    const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7fff)), _mm256_set1_epi16(0x3f80));
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7e00)))),
                         _mm512_set1_ps(kE4M3Scale));
  }
#endif
};

inline float HSum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp's constants (Exp8, Exp16): log2(e), ln(2) in two parts, the polynomial's coefficients (highest first)
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp of eight lanes. With AVX2: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in two parts, p a degree-6
// polynomial (relative error ~2e-7, below float32 rounding of the sums it feeds); inputs are <= 0 here
// (scores minus their running max), clamped at -87 where exp is below float32's normal range and the
// probability is as good as 0 beside the running max's 1. Without AVX2, std::exp lane by lane.
inline v8f Exp8(v8f x) {
#if defined(__AVX2__)
  __m256 v = _mm256_max_ps((__m256)x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), v);
  v = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), v);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(kExpP[i]));
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
  const void* k;  // [N, KV, S, D] of the page element type (Unit's E)
  const void* v;
  const int32_t* table;
  const int32_t* lens;
  const int32_t* pos;
  float* out;
  int64_t R, Bq, H, D, N, KV, S, P, G;
  float sm_scale;
  int64_t window;  // 0: none
  float soft_cap;  // 0: none
  bool bf16 = false;  // block rows' dot products in bfloat16 pairs (BlockPageB), where the build has AVX512-BF16
};

// Whether this build has the bfloat16 dot products BlockPageB uses (AVX512-BF16: AMD Zen 4 and later, Intel Cooper
// Lake and Sapphire Rapids and later); elsewhere the `bf16` attribute changes nothing.
constexpr bool BF16Math() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

constexpr int kBlockQueries = 8;     // BlockPage scores this many query heads at once
constexpr int64_t kMinBlockQueries = 2;  // ... for a page that at least this many queries of a block row see

// Per-thread scratch for one unit: running max, sum and output of each query of the row (index b * H + head),
// and one page's scores for the G queries of a KV head (each S rounded up to whole vectors, `stride` apart).
// One per thread (thread_local below), fitted to each call's problem.
struct Scratch {
  std::vector<float> m, l, acc, s;
  std::vector<float> row;         // RowTwoPass's scores of a decode row's queries over all its keys
  std::vector<float> kt, vf, sb;  // BlockPage's widened page (keys transposed) and its queries' scores
  std::vector<uint32_t> ktb, vfb, qb;  // BlockPageB's: the page and the row's queries as bfloat16 pairs
  std::vector<uint32_t> kall, vall, pairs;  // SharedPieceB's: its pages widened, its probabilities as pairs
  std::vector<int64_t> seen_by;   // the block's queries that see some of a page ...
  std::vector<int32_t> lo, hi;    // ... and which of its keys: [lo, hi)
  int64_t stride = 0;
  // Sized for the call's units; grown only (a thread's units of one call may fit differently)
  void Fit(const Problem& p) {
    stride = (p.S + 7) / 8 * 8;
    Grow(m, p.Bq * p.H);
    Grow(l, p.Bq * p.H);
    Grow(acc, p.Bq * p.H * p.D);
    Grow(s, p.G * stride);
    if (p.Bq > 1) {
      Grow(kt, p.S * p.D);
      Grow(vf, p.S * p.D);
      Grow(sb, kBlockQueries * p.S);
      Grow(ktb, p.S * p.D / 2);
      Grow(vfb, p.S * p.D / 2);
      Grow(qb, p.Bq * p.H * p.D / 2);
      Grow(seen_by, p.Bq);
      Grow(lo, p.Bq);
      Grow(hi, p.Bq);
    }
  }
  // Fit, and for RunShared's units: every query slot's queries as bfloat16 pairs (index (r * Bq + b) * H + head),
  // a page widened in them
  void FitRows(const Problem& p) {
    Fit(p);
    Grow(ktb, p.S * p.D / 2);
    Grow(vfb, p.S * p.D / 2);
    Grow(qb, p.R * p.Bq * p.H * p.D / 2);
  }
  template <typename V>
  static void Grow(V& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  }
  // Query qi's partial softmax state (running max, sum, unnormalized output[D]) into st[0], st[1], st[2 .. D + 2)
  void StoreState(int64_t qi, int64_t D, float* st) const {
    st[0] = m[qi];
    st[1] = l[qi];
    std::copy(acc.begin() + qi * D, acc.begin() + (qi + 1) * D, st + 2);
  }
};

template <typename E>
inline float Dot(const float* a, const typename E::T* b, int64_t D) {
  const int64_t d8 = D / 8 * 8;
  v8f acc0 = v8f{}, acc1 = v8f{};
  int64_t d = 0;
  for (; d + 16 <= d8; d += 16) {
    acc0 += LoadF8(a + d) * E::Load8(b + d);
    acc1 += LoadF8(a + d + 8) * E::Load8(b + d + 8);
  }
  for (; d < d8; d += 8) acc0 += LoadF8(a + d) * E::Load8(b + d);
  float s = HSum(acc0 + acc1);
  for (; d < D; ++d) s += a[d] * E::Load1(b + d);
  return s;
}

#if defined(__AVX2__)
// The dot products of q with 8 consecutive key rows (D apart, D a multiple of 8), as one vector: eight 8-lane
// partial sums reduced together by a transpose-add (7 shuffles and adds for 8 results, not a horizontal sum each).
template <typename E>
inline v8f Dots8(const float* q, const typename E::T* k, int64_t D) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, (__m256)E::Load8(k + i * D + d), a[i]);
  }
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// s[0:n] = q . key rows [0, n) (rows D apart)
template <typename E>
inline void Scores(const float* q, const typename E::T* k, int64_t n, int64_t D, float* s) {
  int64_t j = 0;
#if defined(__AVX2__)
  if (D % 8 == 0)
    for (; j + 8 <= n; j += 8) StoreF8(s + j, Dots8<E>(q, k + j * D, D));
#endif
  for (; j < n; ++j) s[j] = Dot<E>(q, k + j * D, D);
}

// Accumulate for D = 8 * C: the C output vectors stay in registers while the value rows stream by, so the C
// accumulation chains run side by side (one chain over the keys would wait on each add's latency).
template <typename E, int C>
inline void AccumulateRegs(float* acc, float corr, const float* p, const typename E::T* vrows, int64_t n) {
  v8f a[C];
  for (int c = 0; c < C; ++c) a[c] = LoadF8(acc + 8 * c) * corr;
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    for (int c = 0; c < C; ++c) a[c] += pj * E::Load8(vrows + j * 8 * C + 8 * c);
  }
  for (int c = 0; c < C; ++c) StoreF8(acc + 8 * c, a[c]);
}

// acc[0:D] = acc * corr + sum_j p[j] * vrows[j]   (j < n, rows D apart)
template <typename E>
inline void Accumulate(float* acc, float corr, const float* p, const typename E::T* vrows, int64_t n, int64_t D) {
  if (D == 64) return AccumulateRegs<E, 8>(acc, corr, p, vrows, n);
  if (D == 128) return AccumulateRegs<E, 16>(acc, corr, p, vrows, n);
  if (D == 32) return AccumulateRegs<E, 4>(acc, corr, p, vrows, n);
  const int64_t d8 = D / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    v8f a = LoadF8(acc + d) * corr;
    for (int64_t j = 0; j < n; ++j) a += p[j] * E::Load8(vrows + j * D + d);
    StoreF8(acc + d, a);
  }
  for (int64_t d = d8; d < D; ++d) {
    float a = acc[d] * corr;
    for (int64_t j = 0; j < n; ++j) a += p[j] * E::Load1(vrows + j * D + d);
    acc[d] = a;
  }
}

// Online-softmax update of one query over one page's n scores s[0:n] (raw q.k): scales (and soft-caps) them, turns
// them into exp(x - new max) in place, and updates the running max m and sum l; returns the factor the query's
// output accumulated so far must be multiplied by. s has room for whole vectors: the lanes past n are set to -inf
// for the max and give exp(-87 - max) ~ 1e-38 to the sum (never to the output, which reads s[0:n] only).
inline float SoftmaxPage(float* s, int64_t n, float sm_scale, float soft_cap, float& m, float& l) {
  const int64_t n8 = (n + 7) / 8 * 8;
  if (soft_cap > 0.0f)
    for (int64_t j = 0; j < n; ++j) s[j] = soft_cap * std::tanh(s[j] * sm_scale / soft_cap);
  else
    for (int64_t j = 0; j < n; j += 8) StoreF8(s + j, LoadF8(s + j) * sm_scale);
  for (int64_t j = n; j < n8; ++j) s[j] = -std::numeric_limits<float>::infinity();
  v8f mv = LoadF8(s);
  for (int64_t j = 8; j < n8; j += 8) {
    const v8f x = LoadF8(s + j);
    mv = mv > x ? mv : x;
  }
  float mx = m;
  for (int i = 0; i < 8; ++i) mx = std::max(mx, mv[i]);
  v8f sum = v8f{};
  for (int64_t j = 0; j < n8; j += 8) {
    const v8f e = Exp8(LoadF8(s + j) - mx);
    StoreF8(s + j, e);
    sum += e;
  }
  const float corr = std::exp(m - mx);  // exp(-inf) = 0 at the first visible page
  l = l * corr + HSum(sum);
  m = mx;
  return corr;
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr int kAccRegs = 24;  // vector registers the shared loops below may fill with accumulators (of 32)
#else
constexpr int kAccRegs = 12;  // (of 16)
#endif

constexpr int Pow2Below(int x) { return x >= 8 ? 8 : x >= 4 ? 4 : x >= 2 ? 2 : 1; }

#if defined(__AVX2__)
// The 4 sums of a[0..3]'s lanes, into out[0..3].
inline void Sums4(const v8f* a, float* out) {
  const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  const __m256 u = _mm256_hadd_ps(t0, t1);  // [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums of each 128-bit half
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
}
#endif

// The scores of G queries (G x D floats, consecutive) with key rows [0, n) (D apart, D a multiple of 8) into
// s + g * stride: each key vector is loaded (and widened) once for all G queries, KB keys at a time with the
// G x KB accumulators in registers.
template <typename E, int G>
inline void ScoresShared(const float* q, const typename E::T* k, int64_t n, int64_t D, float* s, int64_t stride,
                         const char* pf = nullptr, int64_t pf_bytes = 0) {
  constexpr int KB = Pow2Below(kAccRegs / G) >= 4 ? Pow2Below(kAccRegs / G) : 4;
  int64_t j = 0;
#if defined(__AVX2__)
  const int64_t iters = std::max<int64_t>(n / KB * (D / 8), 1);
  int64_t it = 0, pf_at = 0;
  for (; j + KB <= n; j += KB) {
    v8f acc[G][KB];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < KB; ++i) acc[g][i] = v8f{};
    for (int64_t d = 0; d < D; d += 8) {
      if (pf != nullptr)
        for (const int64_t end = ++it * pf_bytes / iters; pf_at < end; pf_at += 64) PrefetchL2(pf + pf_at);
      v8f qv[G];
      for (int g = 0; g < G; ++g) qv[g] = LoadF8(q + g * D + d);
      for (int i = 0; i < KB; ++i) {
        const v8f kv = E::Load8(k + (j + i) * D + d);
        for (int g = 0; g < G; ++g) acc[g][i] += qv[g] * kv;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < KB; i += 4) Sums4(acc[g] + i, s + g * stride + j + i);
  }
  if (pf != nullptr)
    for (; pf_at < pf_bytes; pf_at += 64) PrefetchL2(pf + pf_at);
#else
  (void)pf;
  (void)pf_bytes;
#endif
  for (int g = 0; g < G; ++g)
    for (int64_t jj = j; jj < n; ++jj) s[g * stride + jj] = Dot<E>(q + g * D, k + jj * D, D);
}

// acc_g[0:D] = acc_g * corr[g] + sum_j p_g[j] * vrows[j] for the G queries (outputs G x D consecutive, p_g at
// p + g * stride; D = 8 * C): each value vector is loaded once for all G, CP of the C output vectors per pass.
// With `pf`, both this and ScoresShared fetch pf_bytes at pf into L2 a few lines per loop step, as their 16-lane
// forms do for the two-pass decode rows (below).
template <typename E, int G, int C>
inline void AccumulateShared(float* acc, const float* corr, const float* p, int64_t stride,
                             const typename E::T* vrows, int64_t n, const char* pf = nullptr,
                             int64_t pf_bytes = 0) {
  constexpr int CP = Pow2Below(kAccRegs / G) < C ? Pow2Below(kAccRegs / G) : C;
  constexpr int D = 8 * C;
  const int64_t iters = std::max<int64_t>(C / CP * n, 1);
  int64_t it = 0, pf_at = 0;
  for (int c0 = 0; c0 < C; c0 += CP) {
    v8f a[G][CP];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CP; ++c) a[g][c] = LoadF8(acc + g * D + 8 * (c0 + c)) * corr[g];
    for (int64_t j = 0; j < n; ++j) {
      if (pf != nullptr)
        for (const int64_t end = ++it * pf_bytes / iters; pf_at < end; pf_at += 64) PrefetchL2(pf + pf_at);
      float pj[G];
      for (int g = 0; g < G; ++g) pj[g] = p[g * stride + j];
      for (int c = 0; c < CP; ++c) {
        const v8f vv = E::Load8(vrows + j * D + 8 * (c0 + c));
        for (int g = 0; g < G; ++g) a[g][c] += pj[g] * vv;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CP; ++c) StoreF8(acc + g * D + 8 * (c0 + c), a[g][c]);
  }
}

// One page's keys [0, n) for the G queries of one KV head (queries, running max/sum and outputs at index qi..
// qi+G-1): scores, softmax update and value accumulation, each key and value row read once for the G of them.
template <typename E, int G, int C>
void PageShared(const Problem& p, Scratch& sc, int64_t qi, const float* q, const typename E::T* k,
                const typename E::T* v, int64_t n) {
  float* s = sc.s.data();
  ScoresShared<E, G>(q, k, n, 8 * C, s, sc.stride);
  float corr[G];
  for (int g = 0; g < G; ++g)
    corr[g] = SoftmaxPage(s + g * sc.stride, n, p.sm_scale, p.soft_cap, sc.m[qi + g], sc.l[qi + g]);
  AccumulateShared<E, G, C>(sc.acc.data() + qi * 8 * C, corr, s, sc.stride, v, n);
}

#if defined(__AVX512F__)
// exp of 16 lanes: Exp8's method (inputs <= 0, clamped at -87)
inline __m512 Exp16(__m512 x) {
  __m512 v = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), v);
  v = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), v);
  __m512 p = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(kExpP[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(v, v), _mm512_add_ps(v, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VL__)
// ScoresShared and AccumulateShared with 16-lane vectors, for D a multiple of 16 (D = 16 * C), for the two-pass
// decode rows below. Half the multiply-adds and widening loads of the 8-lane loops; the score sums are folded to 8
// lanes (one add of the halves) and reduced as there. On a CPU that executes 512-bit operations at full width (AMD
// Zen 5, Intel's server cores) this is up to 2x the arithmetic per cycle; where a 512-bit operation is two 256-bit
// ones (Zen 4) it is no slower.

// With `pf`, both also fetch the pf_bytes at pf into L2 (the next page's block, for RowTwoPass) a few lines per
// iteration of their loops, not as one burst: with a page's worth of prefetches issued at once, reading and computing
// took turns (most likely the burst filled the core's miss buffers and the page's own loads waited behind it). Spread
// out, 64 decode rows over their own 512 float16 keys read at 22-30 GB/s where the burst read 15-22 (bench/notes.md,
// session 28).

// The sums of a[0..3]'s 16 lanes, into out[0..3].
inline void Sums4x16(const __m512* a, float* out) {
  v8f h[4];
  for (int i = 0; i < 4; ++i)
    h[i] = (v8f)_mm256_add_ps(_mm512_castps512_ps256(a[i]),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
  Sums4(h, out);
}

template <typename E, int G>
inline void ScoresShared16(const float* q, const typename E::T* k, int64_t n, int64_t D, float* s, int64_t stride,
                           const char* pf = nullptr, int64_t pf_bytes = 0) {
  constexpr int KB = Pow2Below(kAccRegs / G) >= 4 ? Pow2Below(kAccRegs / G) : 4;
  const int64_t iters = std::max<int64_t>(n / KB * (D / 16), 1);
  int64_t it = 0, pf_at = 0;
  int64_t j = 0;
  for (; j + KB <= n; j += KB) {
    __m512 acc[G][KB];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < KB; ++i) acc[g][i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      if (pf != nullptr)
        for (const int64_t end = ++it * pf_bytes / iters; pf_at < end; pf_at += 64) PrefetchL2(pf + pf_at);
      __m512 qv[G];
      for (int g = 0; g < G; ++g) qv[g] = _mm512_loadu_ps(q + g * D + d);
      for (int i = 0; i < KB; ++i) {
        const __m512 kv = E::Load16(k + (j + i) * D + d);
        for (int g = 0; g < G; ++g) acc[g][i] = _mm512_fmadd_ps(qv[g], kv, acc[g][i]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < KB; i += 4) Sums4x16(acc[g] + i, s + g * stride + j + i);
  }
  if (pf != nullptr)
    for (; pf_at < pf_bytes; pf_at += 64) PrefetchL2(pf + pf_at);
  for (int g = 0; g < G; ++g)
    for (int64_t jj = j; jj < n; ++jj) s[g * stride + jj] = Dot<E>(q + g * D, k + jj * D, D);
}

template <typename E, int G, int C>
inline void AccumulateShared16(float* acc, const float* corr, const float* p, int64_t stride,
                               const typename E::T* vrows, int64_t n, const char* pf = nullptr,
                               int64_t pf_bytes = 0) {
  constexpr int CP = Pow2Below(kAccRegs / G) < C ? Pow2Below(kAccRegs / G) : C;
  constexpr int D = 16 * C;
  const int64_t iters = std::max<int64_t>(C / CP * n, 1);
  int64_t it = 0, pf_at = 0;
  for (int c0 = 0; c0 < C; c0 += CP) {
    __m512 a[G][CP];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CP; ++c)
        a[g][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + 16 * (c0 + c)), _mm512_set1_ps(corr[g]));
    for (int64_t j = 0; j < n; ++j) {
      if (pf != nullptr)
        for (const int64_t end = ++it * pf_bytes / iters; pf_at < end; pf_at += 64) PrefetchL2(pf + pf_at);
      __m512 pj[G];
      for (int g = 0; g < G; ++g) pj[g] = _mm512_set1_ps(p[g * stride + j]);
      for (int c = 0; c < CP; ++c) {
        const __m512 vv = E::Load16(vrows + j * D + 16 * (c0 + c));
        for (int g = 0; g < G; ++g) a[g][c] = _mm512_fmadd_ps(pj[g], vv, a[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CP; ++c) _mm512_storeu_ps(acc + g * D + 16 * (c0 + c), a[g][c]);
  }
}

// Softmax numerators in place over one query's n scores s[0:n] (raw q.k; room for whole 16-lane vectors): scaled
// (and soft-capped), exp(x - max) where max is over all n; returns their sum, and the max in *max_out.
inline float SoftmaxAll(float* s, int64_t n, float sm_scale, float soft_cap, float* max_out) {
  float scale = sm_scale;
  if (soft_cap > 0.0f) {
    for (int64_t j = 0; j < n; ++j) s[j] = soft_cap * std::tanh(s[j] * sm_scale / soft_cap);
    scale = 1.0f;
  }
  const auto mask = [n](int64_t j) { return static_cast<__mmask16>(j + 16 <= n ? 0xffff : (1u << (n - j)) - 1); };
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(scale));
    _mm512_storeu_ps(s + j, x);
    mv = _mm512_mask_max_ps(mv, mask(j), mv, x);
  }
  *max_out = _mm512_reduce_max_ps(mv);
  const __m512 mx = _mm512_set1_ps(*max_out);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(mask(j), Exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx)));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// The two-pass decode rows' loops at 16 lanes (RowTwoPass)
template <int L>
struct RowLoops;

template <>
struct RowLoops<16> {
  template <typename E, int G>
  static void Scores(const float* q, const typename E::T* k, int64_t n, int64_t D, float* s, int64_t stride,
                     const char* pf, int64_t pf_bytes) {
    ScoresShared16<E, G>(q, k, n, D, s, stride, pf, pf_bytes);
  }
  template <typename E, int G, int C>
  static void Accumulate(float* acc, const float* corr, const float* p, int64_t stride, const typename E::T* v,
                         int64_t n, const char* pf, int64_t pf_bytes) {
    AccumulateShared16<E, G, C>(acc, corr, p, stride, v, n, pf, pf_bytes);
  }
  static float Softmax(float* s, int64_t n, float sm_scale, float soft_cap, float* max_out) {
    return SoftmaxAll(s, n, sm_scale, soft_cap, max_out);
  }
};
#endif

#if defined(__AVX2__)
#if !(defined(__AVX512F__) && defined(__AVX512VL__))
template <int L>
struct RowLoops;
#endif

// SoftmaxAll in 8-lane vectors, for the two-pass rows where the build has AVX2 but not AVX-512. s has room for whole
// vectors: the lanes past n are set to -inf for the max and give exp(-87 - max) ~ 1e-38 to the sum (SoftmaxPage's
// way); the values read only s[0:n].
inline float SoftmaxAll8(float* s, int64_t n, float sm_scale, float soft_cap, float* max_out) {
  const int64_t n8 = (n + 7) / 8 * 8;
  if (soft_cap > 0.0f)
    for (int64_t j = 0; j < n; ++j) s[j] = soft_cap * std::tanh(s[j] * sm_scale / soft_cap);
  else
    for (int64_t j = 0; j < n; j += 8) StoreF8(s + j, LoadF8(s + j) * sm_scale);
  for (int64_t j = n; j < n8; ++j) s[j] = -std::numeric_limits<float>::infinity();
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float mx = _mm_cvtss_f32(m4);
  *max_out = mx;
  v8f sum = v8f{};
  for (int64_t j = 0; j < n8; j += 8) {
    const v8f e = Exp8(LoadF8(s + j) - mx);
    StoreF8(s + j, e);
    sum += e;
  }
  return HSum(sum);
}

// The two-pass decode rows' loops at 8 lanes: the online form's shared loops, with the prefetches
template <>
struct RowLoops<8> {
  template <typename E, int G>
  static void Scores(const float* q, const typename E::T* k, int64_t n, int64_t D, float* s, int64_t stride,
                     const char* pf, int64_t pf_bytes) {
    ScoresShared<E, G>(q, k, n, D, s, stride, pf, pf_bytes);
  }
  template <typename E, int G, int C>
  static void Accumulate(float* acc, const float* corr, const float* p, int64_t stride, const typename E::T* v,
                         int64_t n, const char* pf, int64_t pf_bytes) {
    AccumulateShared<E, G, C>(acc, corr, p, stride, v, n, pf, pf_bytes);
  }
  static float Softmax(float* s, int64_t n, float sm_scale, float soft_cap, float* max_out) {
    return SoftmaxAll8(s, n, sm_scale, soft_cap, max_out);
  }
};

// A decode row's KV heads [h0, h1) over its visible keys [lo, hi] in two passes instead of an online softmax a page
// at a time: all scores (page by page), one softmax per query over the whole row, then the values, in L-lane loops
// (RowLoops<L>: ScoresShared16, SoftmaxAll, AccumulateShared16 with AVX-512; ScoresShared, SoftmaxAll8,
// AccumulateShared where the build has AVX2 only). The per-page work the online form repeats -- a running max, a
// rescale of the outputs, the short reductions and the chains between them -- is done once per query. The unit's
// scores are kept in sc.row (at most g_two_pass_max floats: Unit takes the online path beyond). Leaves each query's
// max in sc.m, its sum in sc.l and its unnormalized output in sc.acc (which must start at zero). Returns false when
// a page index is outside the pool (nothing is read from it).
template <typename E, int G, int L, int C>
bool RowTwoPass(const Problem& p, Scratch& sc, int64_t r, int64_t h0, int64_t h1, int64_t lo, int64_t hi) {
  using T = typename E::T;
  using Loops = RowLoops<L>;
  constexpr int64_t D = L * C;
  const int64_t S = p.S;
  hi = std::min(hi, p.P * S - 1);  // as the online path: keys past the table's last page are not seen
  if (lo > hi) return true;
  const int64_t n = hi - lo + 1, nst = (n + 15) / 16 * 16, c0 = lo / S, c1 = hi / S;
  for (int64_t c = c0; c <= c1; ++c)
    if (p.table[r * p.P + c] < 0 || p.table[r * p.P + c] >= p.N) return false;
  sc.row.resize((h1 - h0) * G * nst);
  float* s = sc.row.data();
  const int64_t head_block = S * D * int64_t(sizeof(T));  // one head's keys (or values) in a page
  // fetched while a page is computed: the block kPrefetchAhead bytes ahead in the row's key pages then value pages
  // (a unit of one KV head computes a page in a third of a whole row's time, so it looks three pages ahead)
  const int64_t np = c1 - c0 + 1, ahead = std::max<int64_t>(1, kPrefetchAhead / ((h1 - h0) * head_block));
  auto block = [&](int64_t i) -> const T* {  // the i-th of the row's key pages then value pages, or none
    if (i >= 2 * np) return nullptr;
    return static_cast<const T*>(i < np ? p.k : p.v) + p.table[r * p.P + c0 + i % np] * p.KV * S * D;
  };
  for (int64_t i = 1; i < ahead; ++i)
    if (const T* b = block(i))
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t o = 0; o < head_block; o += 64) PrefetchL2(reinterpret_cast<const char*>(b + h * S * D) + o);
  for (int pass = 0; pass < 2; ++pass) {
    const T* base = static_cast<const T*>(pass == 0 ? p.k : p.v);
    for (int64_t c = c0; c <= c1; ++c) {
      const int64_t page = p.table[r * p.P + c], j0 = c * S;
      const int64_t a = std::max(j0, lo), e = std::min(j0 + S, hi + 1);
      // head by head, a few lines per loop step; near the last key page, the first value pages (so the second pass
      // does not start on cold pages)
      const T* nx = block(pass * np + (c - c0) + ahead);
      for (int64_t h = h0; h < h1; ++h) {
        const char* nh = nx != nullptr ? reinterpret_cast<const char*>(nx + h * S * D) : nullptr;
        const T* blk = base + ((page * p.KV + h) * S + (a - j0)) * D;
        float* sh = s + (h - h0) * G * nst + (a - lo);
        const int64_t qi = h * G;  // Bq == 1: query index b * H + h * G with b = 0
        if (pass == 0) {
          Loops::template Scores<E, G>(p.q + (r * p.H + qi) * D, blk, e - a, D, sh, nst, nh, head_block);
        } else {
          float corr[G];
          std::fill(corr, corr + G, 1.0f);
          Loops::template Accumulate<E, G, C>(sc.acc.data() + qi * D, corr, sh, nst, blk, e - a, nh, head_block);
        }
      }
    }
    if (pass == 0)
      for (int64_t h = h0; h < h1; ++h)
        for (int g = 0; g < G; ++g)
          sc.l[h * G + g] = Loops::Softmax(s + ((h - h0) * G + g) * nst, n, p.sm_scale, p.soft_cap, &sc.m[h * G + g]);
  }
  return true;
}
#endif

// The same for any G and D, one query at a time (each key row re-read from L1 per query).
template <typename E>
void PageEach(const Problem& p, Scratch& sc, int64_t qi, const float* q, const typename E::T* k,
              const typename E::T* v, int64_t n) {
  float* s = sc.s.data();
  for (int64_t g = 0; g < p.G; ++g) {
    Scores<E>(q + g * p.D, k, n, p.D, s);
    const float corr = SoftmaxPage(s, n, p.sm_scale, p.soft_cap, sc.m[qi + g], sc.l[qi + g]);
    Accumulate<E>(sc.acc.data() + (qi + g) * p.D, corr, s, v, n, p.D);
  }
}

template <typename E>
using PageFn = void (*)(const Problem&, Scratch&, int64_t, const float*, const typename E::T*, const typename E::T*,
                        int64_t);

// The page function for this problem: shared loads for G = 2..4 query heads a KV head and D = 32, 64 or 128
// (with AVX2), else one query at a time.
template <typename E>
PageFn<E> PickPage(const Problem& p) {
#if defined(__AVX2__)
#define SGL_PAGE_D(G)                                   \
  if (p.D == 64) return &PageShared<E, G, 8>;           \
  if (p.D == 128) return &PageShared<E, G, 16>;         \
  if (p.D == 32) return &PageShared<E, G, 4>;
  if (p.G == 2) { SGL_PAGE_D(2) }
  if (p.G == 3) { SGL_PAGE_D(3) }
  if (p.G == 4) { SGL_PAGE_D(4) }
#undef SGL_PAGE_D
#endif
  return &PageEach<E>;
}

// A decode row's KV heads [h0, h1) over keys [lo, hi] at once (RowTwoPass), where there is one: (p, sc, row, h0,
// h1, lo, hi) -> false for a page outside the pool
using RowFn = bool (*)(const Problem&, Scratch&, int64_t, int64_t, int64_t, int64_t, int64_t);

// a unit's scores beyond which it stays online (1 MB of floats); SglJaxAttentionTwoPassMax sets it for tests and
// A/B runs
std::atomic<int64_t> g_two_pass_max{int64_t{1} << 18};

template <typename E>
RowFn PickRow(const Problem& p) {
  if (p.Bq != 1) return nullptr;
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define SGL_ROW_D(G)                                    \
  if (p.D == 64) return &RowTwoPass<E, G, 16, 4>;       \
  if (p.D == 128) return &RowTwoPass<E, G, 16, 8>;      \
  if (p.D == 32) return &RowTwoPass<E, G, 16, 2>;
#elif defined(__AVX2__)
#define SGL_ROW_D(G)                                    \
  if (p.D == 64) return &RowTwoPass<E, G, 8, 8>;        \
  if (p.D == 128) return &RowTwoPass<E, G, 8, 16>;      \
  if (p.D == 32) return &RowTwoPass<E, G, 8, 4>;
#else
#define SGL_ROW_D(G)
#endif
  if (p.G == 2) { SGL_ROW_D(2) }
  if (p.G == 3) { SGL_ROW_D(3) }
  if (p.G == 4) { SGL_ROW_D(4) }
#undef SGL_ROW_D
  return nullptr;
}

// A block row's page for its queries at once (BlockPage below), where there is one: (p, sc, row, KV head, number of
// queries in sc.seen_by, key block, value block)
template <typename E>
using BlockFn = void (*)(const Problem&, Scratch&, int64_t, int64_t, int64_t, const typename E::T*,
                         const typename E::T*);

#if defined(__AVX512F__)
// A page of 16 keys that several queries of a block row see (a prefill chunk's pages): the page is widened once,
// its keys transposed to [D, 16] and its values to [16, D] float32 in scratch, and then each query head's 16
// scores are one 16-lane vector built by D multiply-adds of a broadcast query element -- no horizontal reduction,
// and the widening shared by every query of the block, where PageShared, per query, spends its time on those
// (bench/notes.md, "Prefill attention: a page for a block of queries at once"). A query's keys outside its range
// (the causal diagonal, a window's edge) get probability 0 by a lane mask; the softmax update is vectorized over
// the 16 lanes (SoftmaxPage's with a soft cap); values are accumulated two query heads at a time.
//
// The online-softmax update of NQ query heads' 16 raw scores acc[i]: s + 16 i gets exp(score * sm_scale - new max),
// m[i] / l[i] the running max and sum, corr[i] the factor the query's output so far must be multiplied by. With a
// soft cap the update is SoftmaxPage's. Query head i sees the page's keys [lo[i], hi[i]) only: its other lanes get
// probability 0.
template <int NQ>
inline void SoftmaxT(__m512* acc, const Problem& p, float* const* m, float* const* l, const int32_t* lo,
                     const int32_t* hi, float* s, float* corr) {
  __mmask16 seen[NQ];
  for (int i = 0; i < NQ; ++i) seen[i] = static_cast<__mmask16>(((1u << hi[i]) - 1) & ~((1u << lo[i]) - 1));
  if (p.soft_cap > 0.0f) {
    for (int i = 0; i < NQ; ++i) {
      alignas(64) float t[32];
      _mm512_store_ps(t, acc[i]);
      corr[i] = SoftmaxPage(t + lo[i], hi[i] - lo[i], p.sm_scale, p.soft_cap, *m[i], *l[i]);
      _mm512_storeu_ps(s + 16 * i, _mm512_maskz_mov_ps(seen[i], _mm512_load_ps(t)));
    }
    return;
  }
  alignas(64) float diff[16] = {};
  float mx[NQ];
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int i = 0; i < NQ; ++i) {
    acc[i] = _mm512_mask_mul_ps(neg_inf, seen[i], acc[i], _mm512_set1_ps(p.sm_scale));
    mx[i] = std::max(*m[i], _mm512_reduce_max_ps(acc[i]));
    const __m512 e = _mm512_maskz_mov_ps(seen[i], Exp16(_mm512_sub_ps(acc[i], _mm512_set1_ps(mx[i]))));
    _mm512_storeu_ps(s + 16 * i, e);
    acc[i] = e;
    diff[i] = *m[i] - mx[i];  // -inf at the first visible page: exp gives ~1e-38 against an output and sum of 0
  }
  _mm512_store_ps(diff, Exp16(_mm512_load_ps(diff)));
  for (int i = 0; i < NQ; ++i) {
    corr[i] = diff[i];
    *l[i] = *l[i] * diff[i] + _mm512_reduce_add_ps(acc[i]);
    *m[i] = mx[i];
  }
}

// The 16 scores of NQ query heads (q[i], D elements) against the transposed keys kt [D, 16], then SoftmaxT
template <int NQ>
inline void ScoresSoftmaxT(const float* const* q, const float* kt, int64_t D, const Problem& p, float* const* m,
                           float* const* l, const int32_t* lo, const int32_t* hi, float* s, float* corr) {
  __m512 acc[NQ];
  for (int i = 0; i < NQ; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k = _mm512_loadu_ps(kt + d * 16);
    for (int i = 0; i < NQ; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][d]), k, acc[i]);
  }
  SoftmaxT<NQ>(acc, p, m, l, lo, hi, s, corr);
}

#if defined(__AVX512BF16__)
// ScoresSoftmaxT in bfloat16 pairs: q[i] the query head's D / 2 pairs, kt [D / 2, 16] the page's keys as pairs
template <int NQ>
inline void ScoresSoftmaxTB(const uint32_t* const* q, const uint32_t* kt, int64_t D, const Problem& p,
                            float* const* m, float* const* l, const int32_t* lo, const int32_t* hi, float* s,
                            float* corr) {
  __m512 acc[NQ];
  for (int i = 0; i < NQ; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D / 2; ++d) {
    const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + d * 16);
    for (int i = 0; i < NQ; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(q[i][d])), k);
  }
  SoftmaxT<NQ>(acc, p, m, l, lo, hi, s, corr);
}
#endif

template <int C, int NQ>
inline void AccumulateT(float* const* out, const float* corr, const float* p, const float* vf) {
  __m512 a[NQ][C];
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < C; ++c) a[i][c] = _mm512_mul_ps(_mm512_loadu_ps(out[i] + 16 * c), _mm512_set1_ps(corr[i]));
  for (int j = 0; j < 16; ++j) {
    __m512 pj[NQ];
    for (int i = 0; i < NQ; ++i) pj[i] = _mm512_set1_ps(p[16 * i + j]);
    for (int c = 0; c < C; ++c) {
      const __m512 v = _mm512_loadu_ps(vf + j * 16 * C + 16 * c);
      for (int i = 0; i < NQ; ++i) a[i][c] = _mm512_fmadd_ps(pj[i], v, a[i][c]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[i] + 16 * c, a[i][c]);
}

// A block page's query heads, kBlockQueries at a time (PageGroups), in float32 (BlockPage: queries as given, the
// page's keys transposed and values widened) or bfloat16 pairs (BlockPageB: BF16Group below)
struct F32Group {
  using K = float;
  using Q = float;
  static const float* Query(const Problem& p, const Scratch&, int64_t r, int64_t b, int64_t qh) {
    return p.q + ((r * p.Bq + b) * p.H + qh) * p.D;
  }
  template <int NQ>
  static void Scores(const Q* const* q, const K* kt, int64_t D, const Problem& p, float* const* m, float* const* l,
                     const int32_t* lo, const int32_t* hi, float* s, float* corr) {
    ScoresSoftmaxT<NQ>(q, kt, D, p, m, l, lo, hi, s, corr);
  }
  template <int C, int NQ>
  static void Values(float* const* out, const float* corr, const float* s, const K* vf) {
    AccumulateT<C, NQ>(out, corr, s, vf);
  }
};

// The block row r's query heads that see the page (sc.seen_by[0:nf] x G, their keys sc.lo / sc.hi) for KV head h:
// scores and online softmax 8, 4 or 1 at a time, then the values two at a time.
template <typename Gr, int C>
void PageGroups(const Problem& p, Scratch& sc, int64_t r, int64_t h, int64_t nf, const typename Gr::K* kt,
                const typename Gr::K* vf) {
  constexpr int D = 16 * C;
  const int64_t G = p.G, heads = nf * G;
  for (int64_t i0 = 0; i0 < heads; i0 += kBlockQueries) {
    const int nq = static_cast<int>(std::min<int64_t>(kBlockQueries, heads - i0));
    const typename Gr::Q* q[kBlockQueries];
    float *out[kBlockQueries], *m[kBlockQueries], *l[kBlockQueries];
    int32_t lo[kBlockQueries], hi[kBlockQueries];
    for (int i = 0; i < nq; ++i) {
      const int64_t f = (i0 + i) / G, b = sc.seen_by[f], g = (i0 + i) % G, qi = b * p.H + h * G + g;
      lo[i] = sc.lo[f];
      hi[i] = sc.hi[f];
      q[i] = Gr::Query(p, sc, r, b, h * G + g);
      out[i] = sc.acc.data() + qi * D;
      m[i] = sc.m.data() + qi;
      l[i] = sc.l.data() + qi;
    }
    float* s = sc.sb.data();
    float corr[kBlockQueries];
    int i = 0;
    for (; i + 8 <= nq; i += 8)
      Gr::template Scores<8>(q + i, kt, D, p, m + i, l + i, lo + i, hi + i, s + 16 * i, corr + i);
    for (; i + 4 <= nq; i += 4)
      Gr::template Scores<4>(q + i, kt, D, p, m + i, l + i, lo + i, hi + i, s + 16 * i, corr + i);
    for (; i < nq; ++i) Gr::template Scores<1>(q + i, kt, D, p, m + i, l + i, lo + i, hi + i, s + 16 * i, corr + i);
    int k = 0;
    for (; k + 2 <= nq; k += 2) Gr::template Values<C, 2>(out + k, corr + k, s + 16 * k, vf);
    for (; k < nq; ++k) Gr::template Values<C, 1>(out + k, corr + k, s + 16 * k, vf);
  }
}

#if defined(__AVX512BF16__)
// 16 float32 lanes as 16 bfloat16 (rounded to nearest even) in 16-bit lanes: 8 pairs of neighbours, each pair one
// 32-bit lane of VDPBF16PS's operands (the lower element in the low half)
inline __m256i ToBF16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// AccumulateT in bfloat16 pairs: vf [8, D] the page's values as pairs of keys (2 jp, 2 jp + 1) per dimension
// (query head i's 16 probabilities at p[i])
template <int C, int NQ>
inline void AccumulateTB(float* const* out, const float* corr, const float* const* p, const uint32_t* vf) {
  __m512 a[NQ][C];
  alignas(32) uint32_t pb[NQ][8];  // each query head's 16 probabilities as 8 pairs
  for (int i = 0; i < NQ; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(pb[i]), ToBF16(_mm512_loadu_ps(p[i])));
    for (int c = 0; c < C; ++c) a[i][c] = _mm512_mul_ps(_mm512_loadu_ps(out[i] + 16 * c), _mm512_set1_ps(corr[i]));
  }
  for (int jp = 0; jp < 8; ++jp) {
    __m512bh pj[NQ];
    for (int i = 0; i < NQ; ++i) pj[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pb[i][jp]));
    for (int c = 0; c < C; ++c) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(vf + jp * 16 * C + 16 * c);
      for (int i = 0; i < NQ; ++i) a[i][c] = _mm512_dpbf16_ps(a[i][c], pj[i], v);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[i] + 16 * c, a[i][c]);
}

// Row r's query heads [h0, h1) (all its query slots) as bfloat16 pairs into sc.qb: slot b at (slot + b) * H (for
// BlockPageB slot 0; for SharedPieceB r * Bq, its query slots' own indices)
inline void ConvertQueries(const Problem& p, Scratch& sc, int64_t r, int64_t h0, int64_t h1, int64_t slot = 0) {
  const int64_t D = p.D;
  for (int64_t b = 0; b < p.Bq; ++b)
    for (int64_t qh = h0 * p.G; qh < h1 * p.G; ++qh) {
      const float* x = p.q + ((r * p.Bq + b) * p.H + qh) * D;
      uint32_t* y = sc.qb.data() + ((slot + b) * p.H + qh) * (D / 2);
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + d / 2), ToBF16(_mm512_loadu_ps(x + d)));
    }
}

// PageGroups in bfloat16 pairs: the queries from sc.qb (ConvertQueries), keys and values as BlockPageB widens them
struct BF16Group {
  using K = uint32_t;
  using Q = uint32_t;
  static const uint32_t* Query(const Problem& p, const Scratch& sc, int64_t, int64_t b, int64_t qh) {
    return sc.qb.data() + (b * p.H + qh) * (p.D / 2);
  }
  template <int NQ>
  static void Scores(const Q* const* q, const K* kt, int64_t D, const Problem& p, float* const* m, float* const* l,
                     const int32_t* lo, const int32_t* hi, float* s, float* corr) {
    ScoresSoftmaxTB<NQ>(q, kt, D, p, m, l, lo, hi, s, corr);
  }
  template <int C, int NQ>
  static void Values(float* const* out, const float* corr, const float* s, const K* vf) {
    const float* ps[NQ];
    for (int i = 0; i < NQ; ++i) ps[i] = s + 16 * i;
    AccumulateTB<C, NQ>(out, corr, ps, vf);
  }
};

// The 16 x 16 32-bit matrix r (a row a vector) transposed in registers, into r: three rounds of shuffles (pairs,
// then quads within 128-bit lanes, then the lanes themselves), 64 in all against 256 scalar stores.
inline void Transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4 i + k], 128-bit lane L: column 4 L + k of rows 4 i .. 4 i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// A page's keys [j0, j1) as bfloat16 pairs of dimensions, transposed: kt [D / 2, 16] (keys outside: zeros, not
// read). Each key's 32 dimensions at a time are one vector of 16 pairs; 16 keys' such vectors are transposed in
// registers (Transpose16).
template <typename E, int C>
inline void WidenKeysB(const typename E::T* kb, int32_t j0, int32_t j1, uint32_t* kt) {
  constexpr int D = 16 * C;
  static_assert(C % 2 == 0, "D a multiple of 32");
  for (int c = 0; c < C; c += 2) {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      const bool read = j >= j0 && j < j1;
      const __m512 lo = read ? E::Load16(kb + j * D + 16 * c) : _mm512_setzero_ps();
      const __m512 hi = read ? E::Load16(kb + j * D + 16 * c + 16) : _mm512_setzero_ps();
      r[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // dimensions 16 c .. 16 c + 31 as 16 pairs
    }
    Transpose16(r);
    for (int d = 0; d < 16; ++d) _mm512_storeu_si512(kt + (8 * c + d) * 16, r[d]);
  }
}

// A page's values [j0, j1) as bfloat16 pairs of keys: vf [8, D] (keys outside: zeros, not read)
template <typename E, int C>
inline void WidenValuesB(const typename E::T* vb, int32_t j0, int32_t j1, uint32_t* vf) {
  constexpr int D = 16 * C;
  for (int jp = 0; jp < 8; ++jp)
    for (int c = 0; c < C; ++c) {
      const int j = 2 * jp;
      const __m512 v0 = j >= j0 && j < j1 ? E::Load16(vb + j * D + 16 * c) : _mm512_setzero_ps();
      const __m512 v1 = j + 1 >= j0 && j + 1 < j1 ? E::Load16(vb + (j + 1) * D + 16 * c) : _mm512_setzero_ps();
      const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(ToBF16(v0)),
                                           _mm512_slli_epi32(_mm512_cvtepu16_epi32(ToBF16(v1)), 16));
      _mm512_storeu_si512(vf + jp * D + 16 * c, pair);
    }
}

// The raw scores q.k of NQ query heads (bfloat16 pairs) against a page's keys kt [D / 2, 16] (WidenKeysB) into
// s[i][0:16], A multiply-add chains a query (NQ x A >= 8 keep the multiply-adds' latency covered)
template <int NQ, int A>
inline void ScoresTB(const uint32_t* const* q, const uint32_t* kt, int64_t D, float* const* s) {
  __m512 acc[NQ][A];
  for (int i = 0; i < NQ; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D / 2; d += A)
    for (int a = 0; a < A; ++a) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + (d + a) * 16);
      for (int i = 0; i < NQ; ++i)
        acc[i][a] = _mm512_dpbf16_ps(acc[i][a], (__m512bh)_mm512_set1_epi32(static_cast<int>(q[i][d + a])), k);
    }
  for (int i = 0; i < NQ; ++i) {
    __m512 t = acc[i][0];
    for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[i][a]);
    _mm512_storeu_ps(s[i], t);
  }
}

// ScoresTB for NP consecutive pages at once (kt: NP pages of [D / 2, 16], D / 2 * 16 apart; s[i] + 16 pg query i's
// scores of page pg): each query pair's broadcast serves NP pages, and NQ x NP chains run side by side.
template <int NQ, int NP>
inline void ScoresPagesTB(const uint32_t* const* q, const uint32_t* kt, int64_t D, float* const* s) {
  __m512 acc[NQ][NP];
  for (int i = 0; i < NQ; ++i)
    for (int g = 0; g < NP; ++g) acc[i][g] = _mm512_setzero_ps();
  const int64_t page = D / 2 * 16;
  for (int64_t d = 0; d < D / 2; ++d) {
    __m512bh k[NP];
    for (int g = 0; g < NP; ++g) k[g] = (__m512bh)_mm512_loadu_si512(kt + g * page + d * 16);
    for (int i = 0; i < NQ; ++i) {
      const __m512bh qd = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[i][d]));
      for (int g = 0; g < NP; ++g) acc[i][g] = _mm512_dpbf16_ps(acc[i][g], qd, k[g]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int g = 0; g < NP; ++g) _mm512_storeu_ps(s[i] + 16 * g, acc[i][g]);
}

// BlockPage in bfloat16 pairs (float32 sums): keys as pairs of dimensions, values as pairs of keys, the queries
// from sc.qb (ConvertQueries) and the probabilities rounded as they are accumulated (AccumulateTB)
template <typename E, int C>
void BlockPageB(const Problem& p, Scratch& sc, int64_t r, int64_t h, int64_t nf,
                const typename E::T* kb, const typename E::T* vb) {
  const int32_t j0 = *std::min_element(sc.lo.begin(), sc.lo.begin() + nf);
  const int32_t j1 = *std::max_element(sc.hi.begin(), sc.hi.begin() + nf);
  WidenKeysB<E, C>(kb, j0, j1, sc.ktb.data());
  WidenValuesB<E, C>(vb, j0, j1, sc.vfb.data());
  PageGroups<BF16Group, C>(p, sc, r, h, nf, sc.ktb.data(), sc.vfb.data());
}
#endif

// The block row r's queries sc.seen_by[0:nf] (indices b) see page keys [sc.lo, sc.hi) of head h: kb / vb its
// blocks. Keys no query sees are not read (they may hold stale or non-finite data): their rows are zeros here.
template <typename E, int C>
void BlockPage(const Problem& p, Scratch& sc, int64_t r, int64_t h, int64_t nf,
               const typename E::T* kb, const typename E::T* vb) {
  constexpr int D = 16 * C;
  float* kt = sc.kt.data();
  float* vf = sc.vf.data();
  const int32_t j0 = *std::min_element(sc.lo.begin(), sc.lo.begin() + nf);
  const int32_t j1 = *std::max_element(sc.hi.begin(), sc.hi.begin() + nf);
  for (int j = 0; j < 16; ++j)
    for (int c = 0; c < C; ++c) {
      alignas(64) float row[16];
      const bool read = j >= j0 && j < j1;
      _mm512_store_ps(row, read ? E::Load16(kb + j * D + 16 * c) : _mm512_setzero_ps());
      for (int d = 0; d < 16; ++d) kt[(16 * c + d) * 16 + j] = row[d];
      _mm512_storeu_ps(vf + j * D + 16 * c, read ? E::Load16(vb + j * D + 16 * c) : _mm512_setzero_ps());
    }
  PageGroups<F32Group, C>(p, sc, r, h, nf, kt, vf);
}

// BlockPage (BlockPageB with the `bf16` attribute) for pages of 16 keys and D = 64 or 128, else none
template <typename E>
BlockFn<E> PickPageBlock(const Problem& p) {
  if (p.S != 16) return nullptr;
#if defined(__AVX512BF16__)
  if (p.bf16) {
    if (p.D == 64) return &BlockPageB<E, 4>;
    if (p.D == 128) return &BlockPageB<E, 8>;
  }
#endif
  if (p.D == 64) return &BlockPage<E, 4>;
  if (p.D == 128) return &BlockPage<E, 8>;
  return nullptr;
}
#else
template <typename E>
BlockFn<E> PickPageBlock(const Problem&) { return nullptr; }
#endif

// The block rows' page function (block rows only: none for decode rows, every query through the page function)
template <typename E>
BlockFn<E> PickBlock(const Problem& p) {
  return p.Bq < 2 ? nullptr : PickPageBlock<E>(p);
}

// Row r, KV heads [h0, h1). Returns false when a page index is outside the pool (nothing is read from it). The
// heads are visited inside the page loop: a page's blocks for consecutive heads are adjacent in the pool, so a
// unit of several heads reads each page's keys (and values) as one run of memory rather than one 4 KB block per
// pass over the row.
//
// With `states` (a block row's keys from the page-aligned `first_key` on, for RunShared): each query's partial
// softmax state -- [max, sum, output[D]] unnormalized, D + 2 apart, query slot b's G of head h at (b * G + g) --
// goes to states instead of its output to p.out (one KV head a unit: h1 = h0 + 1).
template <typename E>
bool Unit(const Problem& p, int64_t r, int64_t h0, int64_t h1, Scratch& sc, PageFn<E> page_fn, BlockFn<E> block_fn,
          RowFn row_fn, int64_t first_key = 0, float* states = nullptr) {
  using T = typename E::T;
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
  lo = std::max(lo, first_key);
  bool ok = true;
#if defined(__AVX512BF16__)
  if (block_fn && p.bf16) ConvertQueries(p, sc, r, h0, h1);
#endif
  const int64_t two_pass_max = g_two_pass_max.load(std::memory_order_relaxed);
  if (row_fn && hi >= 0 && lo <= hi && (hi - lo + 16) * (h1 - h0) * G <= two_pass_max) {
    ok = row_fn(p, sc, r, h0, h1, lo, hi);
  } else if (hi >= 0 && lo <= hi) {
    const int64_t c_end = std::min<int64_t>(hi / S, p.P - 1);
    for (int64_t c = lo / S; c <= c_end; ++c) {
      const int64_t page = p.table[r * p.P + c];
      if (page < 0 || page >= p.N) {
        ok = false;
        break;
      }
      const int64_t j0 = c * S;
      if (c < c_end) {  // the next page's blocks for these heads are fetched while this one is computed
        const int64_t next = p.table[r * p.P + c + 1];
        if (next >= 0 && next < p.N) {
          const int64_t off = (next * p.KV + h0) * S * D * sizeof(T), bytes = (h1 - h0) * S * D * sizeof(T);
          const char* kn = static_cast<const char*>(p.k) + off;
          const char* vn = static_cast<const char*>(p.v) + off;
          for (int64_t o = 0; o < bytes; o += 64) {
            PrefetchL2(kn + o);
            PrefetchL2(vn + o);
          }
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        const T* kb = static_cast<const T*>(p.k) + (page * p.KV + h) * S * D;
        const T* vb = static_cast<const T*>(p.v) + (page * p.KV + h) * S * D;
        int64_t nf = 0;  // queries that see some of the page, for block_fn
        for (int64_t b = 0; b < p.Bq; ++b) {
          const int64_t t = p.pos[r * p.Bq + b];
          if (t < 0) continue;
          // this query's visible keys in the page: [a, e)
          const int64_t first = p.window > 0 ? std::max<int64_t>(0, t - p.window + 1) : 0;
          const int64_t a = std::max(j0, first);
          const int64_t e = std::min<int64_t>({j0 + S, t + 1, int64_t{len}});
          if (a >= e) continue;
          if (block_fn) {
            sc.seen_by[nf] = b;
            sc.lo[nf] = static_cast<int32_t>(a - j0);
            sc.hi[nf++] = static_cast<int32_t>(e - j0);
            continue;
          }
          const int64_t n = e - a;
          const int64_t qi = b * p.H + h * G;
          page_fn(p, sc, qi, p.q + ((r * p.Bq + b) * p.H + h * G) * D, kb + (a - j0) * D, vb + (a - j0) * D, n);
        }
        if (nf >= kMinBlockQueries) {
          block_fn(p, sc, r, h, nf, kb, vb);
        } else {
          for (int64_t i = 0; i < nf; ++i) {  // too few to pay for widening the page once
            const int64_t b = sc.seen_by[i], qi = b * p.H + h * G, a = sc.lo[i];
            page_fn(p, sc, qi, p.q + ((r * p.Bq + b) * p.H + h * G) * D, kb + a * D, vb + a * D, sc.hi[i] - a);
          }
        }
      }
    }
  }
  if (states) {
    for (int64_t b = 0; b < p.Bq; ++b)
      for (int64_t g = 0; g < G; ++g) sc.StoreState(b * p.H + h0 * G + g, D, states + (b * G + g) * (D + 2));
    return ok;
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

// Decode rows split along their keys. With few rows there are few (row, KV head) units -- one row of SmolLM2 is 3,
// which two threads run as 2 + 1 -- so each unit is cut into page-aligned key ranges (RowTwoPass over each),
// enough that the units share out evenly, and the ranges' partial softmax states are merged (max, sum, output).
// A range has at least g_split_min_keys keys; SglJaxAttentionSplitMinKeys sets it for tests and A/B runs.
std::atomic<int64_t> g_split_min_keys{128};
constexpr int64_t kSplitUnitsPerThread = 4;

// Decode row r's visible keys [lo, hi] (none when hi < lo): up to its query, its length and the table's end, from
// the window's start.
inline void DecodeKeys(const Problem& p, int64_t r, int64_t& lo, int64_t& hi) {
  const int64_t t = p.pos[r];
  hi = t < 0 ? -1 : std::min<int64_t>({t, int64_t{p.lens[r]} - 1, p.P * p.S - 1});
  lo = p.window > 0 ? std::max<int64_t>(0, t - p.window + 1) : 0;
}

// The key ranges per (row, KV head) for this decode problem, or 1 (no split).
int64_t DecodeSplits(const Problem& p, int64_t threads) {
  const int64_t min_keys = g_split_min_keys.load(std::memory_order_relaxed);
  if (p.Bq != 1 || p.R >= kRowUnits || min_keys <= 0 || threads < 2) return 1;
  int64_t keys = 0;  // the longest row's visible keys
  for (int64_t r = 0, lo, hi; r < p.R; ++r) {
    DecodeKeys(p, r, lo, hi);
    keys = std::max(keys, hi - lo + 1);
  }
  const int64_t base = p.R * p.KV;
  // with units enough already, only an odd one left over remains to even out: worth a merge on long rows only
  // (7 rows at 256 keys ran 3-8 % slower split, at 1,024-2,048 keys 5-10 % faster; bench/notes.md, session 21)
  if (base >= kSplitUnitsPerThread * threads && keys < 4 * min_keys) return 1;
  int64_t k = (kSplitUnitsPerThread * threads + base - 1) / base;
  while (base * k % threads) ++k;  // whole rounds of units: none left for one thread alone
  k = std::min(k, keys / min_keys);
  if (k < 2 || (keys / k + p.S + 16) * p.G > g_two_pass_max.load(std::memory_order_relaxed)) return 1;
  return k;
}

// One query's output from n partial softmax states over disjoint key ranges, each [max, sum, output[D]] at
// base + offs[i]: the outputs weighed by exp(max - the largest max), over the weighed sums; zeros where no state
// saw a key.
inline void MergeStates(const float* base, const int64_t* offs, int64_t n, int64_t D, float* o) {
  float mx = -std::numeric_limits<float>::infinity(), l = 0.0f;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, base[offs[i]]);
  std::fill(o, o + D, 0.0f);
  if (mx == -std::numeric_limits<float>::infinity()) return;  // the row sees no key
  for (int64_t i = 0; i < n; ++i) {
    const float* si = base + offs[i];
    if (si[1] <= 0.0f) continue;
    const float w = std::exp(si[0] - mx);
    l += si[1] * w;
    for (int64_t d = 0; d < D; ++d) o[d] += si[2 + d] * w;
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int64_t d = 0; d < D; ++d) o[d] *= inv;
}

// Decode row r's keys [lo, hi] for KV head h (RowTwoPass) as the partial states of its G queries ([max, sum,
// output[D]] each, D + 2 apart) at out. False for a page outside the pool.
inline bool RowRangeState(const Problem& p, Scratch& sc, RowFn row_fn, int64_t r, int64_t h, int64_t lo, int64_t hi,
                          float* out) {
  const int64_t G = p.G, D = p.D, W = D + 2, qi = h * G;  // RowTwoPass's state of a decode row's queries (Bq = 1)
  std::fill(sc.acc.begin() + qi * D, sc.acc.begin() + (qi + G) * D, 0.0f);
  if (!row_fn(p, sc, r, h, h + 1, lo, hi)) return false;
  for (int64_t g = 0; g < G; ++g) sc.StoreState(qi + g, D, out + g * W);
  return true;
}

// The decode problem as R x KV x k units of key ranges (DecodeSplits), then one merge per query.
template <typename E>
void RunSplit(ffi::ThreadPool& pool, const Problem& p, std::atomic<bool>& bad_page, RowFn row_fn, int64_t k) {
  const int64_t G = p.G, D = p.D, W = D + 2;  // a range's state for one query: max, sum, output[D]
  std::vector<float> part(p.R * p.KV * k * G * W);
  float* parts = part.data();
  RunUnits(pool, p.R * p.KV * k, [&p, parts, k, G, D, W, row_fn, &bad_page](int64_t u) {
    thread_local Scratch sc;
    sc.Fit(p);
    const int64_t r = u / (p.KV * k), h = u / k % p.KV, i = u % k, S = p.S;
    float* out = parts + u * G * W;
    for (int64_t g = 0; g < G; ++g) {
      out[g * W] = -std::numeric_limits<float>::infinity();
      std::fill(out + g * W + 1, out + (g + 1) * W, 0.0f);
    }
    int64_t lo, hi;
    DecodeKeys(p, r, lo, hi);
    if (lo > hi) return;
    const int64_t c0 = lo / S, np = hi / S - c0 + 1;
    const int64_t a = c0 + np * i / k, b = c0 + np * (i + 1) / k;  // this range's pages [a, b)
    if (a >= b) return;
    if (!RowRangeState(p, sc, row_fn, r, h, std::max(lo, a * S), std::min(hi, b * S - 1), out)) bad_page.store(true);
  });
  std::vector<int64_t> offs(k);
  for (int64_t i = 0; i < k; ++i) offs[i] = i * G * W;  // range i's state, from range 0's
  for (int64_t r = 0; r < p.R; ++r)
    for (int64_t h = 0; h < p.KV; ++h)
      for (int64_t g = 0; g < G; ++g)
        MergeStates(parts + (r * p.KV + h) * k * G * W + g * W, offs.data(), k, D, p.out + (r * p.H + h * G + g) * D);
}

// Decode rows that share their first pages: a fork's branches over one prompt, requests on one system prompt, a
// sequence's tokens laid out as decode rows. Row by row, every row re-reads (and widens) the shared pages and its
// G queries score them alone (RowTwoPass). With the `bf16` attribute (and AVX512-BF16), a run of at least
// kSharedMinRows rows that share at least g_shared_min_pages whole pages instead computes them once for all its
// rows' queries (SharedPieceB), each row's own keys past them as before (RowTwoPass), and the partial softmax
// states are merged per query (MergeStates). Fewer rows or pages ran no faster (2 rows at 448 shared keys 5 %
// slower, 6 rows at 64-128 shared keys 15-25 % slower: bench/notes.md, "Shared pages computed once"). A block
// row's pages before its first query are such a run too (BlockRuns). 0 turns it off (SglJaxAttentionSharedMinPages,
// for tests and A/B runs).
std::atomic<int64_t> g_shared_min_pages{8};
constexpr int64_t kSharedMinRows = 3;     // ... and at least this many rows
constexpr int64_t kSharedRangePages = 8;  // a unit of a run's pages has at least this many

// Rows order[first, first + n) share their first `pages` pages (and see all their keys).
struct SharedRun {
  int64_t first, n, pages;
};

// A unit of RunShared's: run >= 0: that run's pages [lo, hi) for KV head h (SharedPieceB); run == kOwnKeys: decode
// row's own keys [lo, hi] for KV head h (RowRangeState); run == kBlockKeys: block row's keys from lo on for KV head h
// (Unit). Its partial states (G a query slot, [max, sum, output[D]] each) go to the call's states at `state`; `work`
// orders the units (the longest first).
struct Piece {
  int64_t run, row, h, lo, hi, state, work;
};
constexpr int64_t kOwnKeys = -1, kBlockKeys = -2;

// Runs of rows that read the same leading pages: the rows with whole[r] >= min_pages (the whole pages row r's every
// query sees from key 0), sorted by their page tables up to those pages, then cut where a row would share fewer than
// min_pages pages with the run so far -- or, with `hold`, under 3/4 of its own whole pages or of the run's so far
// (a block row alone computes all its whole pages this way, and is not held to a short prefix it shares). `order`
// gets the runs' rows; each run the pages all its rows share.
std::vector<SharedRun> RowRuns(const Problem& p, int64_t min_pages, const std::vector<int64_t>& whole,
                               std::vector<int64_t>& order, bool hold) {
  std::vector<SharedRun> runs;
  order.clear();
  for (int64_t r = 0; r < p.R; ++r)
    if (whole[r] >= min_pages) order.push_back(r);
  const int32_t* t = p.table;
  auto common = [&](int64_t a, int64_t b) {
    const int64_t n = std::min(whole[a], whole[b]);
    int64_t c = 0;
    while (c < n && t[a * p.P + c] == t[b * p.P + c]) ++c;
    return c;
  };
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t c = common(a, b);
    if (c < std::min(whole[a], whole[b])) return t[a * p.P + c] < t[b * p.P + c];
    return whole[a] != whole[b] ? whole[a] < whole[b] : a < b;
  });
  for (size_t i = 0; i < order.size();) {
    size_t j = i + 1;
    int64_t pages = whole[order[i]];
    for (; j < order.size(); ++j) {  // sorted: what a row shares with the run is what it shares with the last
      const int64_t b = order[j], c = std::min(pages, common(order[j - 1], b));
      if (c < min_pages || (hold && (4 * c < 3 * whole[b] || 4 * c < 3 * pages))) break;
      pages = c;
    }
    runs.push_back({static_cast<int64_t>(i), static_cast<int64_t>(j - i), pages});
    i = j;
  }
  return runs;
}

// The runs of decode rows sharing >= min_pages whole leading pages (RowRuns over the rows whose visible keys start
// at 0), of kSharedMinRows rows at least; `order` their rows (= query slots, Bq = 1).
std::vector<SharedRun> SharedRuns(const Problem& p, int64_t min_pages, std::vector<int64_t>& order) {
  std::vector<int64_t> whole(p.R, 0);
  for (int64_t r = 0, lo, hi; r < p.R; ++r) {
    DecodeKeys(p, r, lo, hi);
    if (lo == 0 && hi >= 0) whole[r] = std::min((hi + 1) / p.S, p.P);
  }
  std::vector<SharedRun> runs;
  for (const SharedRun& run : RowRuns(p, min_pages, whole, order, false))
    if (run.n >= kSharedMinRows) runs.push_back(run);
  return runs;
}

// Block rows (prefill chunks) whose queries all see at least min_pages whole pages before their chunk -- a cached
// prefix -- are runs too: chunks on one prefix (a fork's branch prompts, a select's choices) together (RowRuns), a
// run's query slots (r * Bq + b) in order. Needs no window, and queries x pages of at least kBlockSharedMinWork:
// short chunks over short prefixes, each on its own, ran up to 16 % slower this way (32 chunks of 8 queries after
// 150-300 keys), 256 and more 1.05-2x faster (bench/notes.md, "Shared pages computed once").
constexpr int64_t kBlockSharedMinWork = 256;

std::vector<SharedRun> BlockRuns(const Problem& p, int64_t min_pages, std::vector<int64_t>& order) {
  std::vector<SharedRun> runs;
  order.clear();
  if (p.window > 0) return runs;
  std::vector<int64_t> whole(p.R, 0), queries(p.R, 0), rows;
  for (int64_t r = 0; r < p.R; ++r) {
    int64_t first = std::numeric_limits<int64_t>::max();
    for (int64_t b = 0; b < p.Bq; ++b)
      if (p.pos[r * p.Bq + b] >= 0) {
        first = std::min<int64_t>(first, p.pos[r * p.Bq + b]);
        ++queries[r];
      }
    if (queries[r]) whole[r] = std::min<int64_t>(std::min<int64_t>(first, p.lens[r]) / p.S, p.P);
  }
  for (const SharedRun& run : RowRuns(p, min_pages, whole, rows, true)) {
    int64_t n = 0;
    for (int64_t i = 0; i < run.n; ++i) n += queries[rows[run.first + i]];
    if (n * run.pages < kBlockSharedMinWork) continue;
    runs.push_back({static_cast<int64_t>(order.size()), n, run.pages});
    for (int64_t i = 0; i < run.n; ++i)
      for (int64_t b = 0, r = rows[run.first + i]; b < p.Bq; ++b)
        if (p.pos[r * p.Bq + b] >= 0) order.push_back(r * p.Bq + b);
  }
  return runs;
}

#if defined(__AVX512BF16__)
// out[i][0:D] = sum over a piece's keys of query i's probability (bfloat16 pairs of keys, pb[i]) times the key's
// value (vall: np pages of WidenValuesB's [8, D] pairs): the NQ x C accumulators stay in registers over all pages.
template <int C, int NQ>
inline void ValuesAllTB(float* const* out, const uint32_t* const* pb, const uint32_t* vall, int64_t np) {
  constexpr int D = 16 * C;
  __m512 a[NQ][C];
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < C; ++c) a[i][c] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < np * 8; ++jp) {
    const uint32_t* v = vall + jp * D;
    for (int c = 0; c < C; ++c) {
      const __m512bh vc = (__m512bh)_mm512_loadu_si512(v + 16 * c);
      for (int i = 0; i < NQ; ++i)
        a[i][c] = _mm512_dpbf16_ps(a[i][c], (__m512bh)_mm512_set1_epi32(static_cast<int>(pb[i][jp])), vc);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[i] + 16 * c, a[i][c]);
}

// A run's pages [pc.lo, pc.hi) for KV head pc.h, for all its query slots at once (`slots`: r * Bq + b -- decode
// rows' one query each, or a block row's queries), into their states, in two passes as RowTwoPass (every score,
// one softmax per query, then the values): every page of the piece widened once for all the queries (WidenKeysB /
// WidenValuesB), each query's scores 16 keys a multiply-add (ScoresPagesTB), its probabilities rounded to bfloat16
// pairs and its output accumulated over all pages in registers (ValuesAllTB): q.k and p.v in bfloat16 pairs with
// float32 sums as BlockPageB. False for a page outside the pool.
template <typename E, int C>
bool SharedPieceB(const Problem& p, Scratch& sc, const Piece& pc, const int64_t* slots, int64_t n, float* states) {
  using T = typename E::T;
  constexpr int64_t D = 16 * C, DP = D / 2;
  const int64_t G = p.G, S = p.S, W = D + 2, h = pc.h, nq = n * G, np = pc.hi - pc.lo, nk = np * S;
  const int32_t* t = p.table + slots[0] / p.Bq * p.P + pc.lo;
  for (int64_t c = 0; c < np; ++c)
    if (t[c] < 0 || t[c] >= p.N) return false;
  for (int64_t i = 0; i < n; ++i)  // each row's queries once (a block row's slots are consecutive)
    if (i == 0 || slots[i] / p.Bq != slots[i - 1] / p.Bq)
      ConvertQueries(p, sc, slots[i] / p.Bq, h, h + 1, slots[i] / p.Bq * p.Bq);
  Scratch::Grow(sc.kall, np * DP * 16);
  Scratch::Grow(sc.vall, np * 8 * D);
  Scratch::Grow(sc.row, nq * nk);
  Scratch::Grow(sc.pairs, nq * nk / 2);
  const int64_t bytes = S * D * sizeof(T);
  for (int64_t c = 0; c < np; ++c) {
    if (c + 1 < np) {
      const int64_t off = (t[c + 1] * p.KV + h) * bytes;
      for (int64_t o = 0; o < bytes; o += 64) {
        PrefetchL2(static_cast<const char*>(p.k) + off + o);
        PrefetchL2(static_cast<const char*>(p.v) + off + o);
      }
    }
    const int64_t blk = (t[c] * p.KV + h) * S * D;
    WidenKeysB<E, C>(static_cast<const T*>(p.k) + blk, 0, 16, sc.kall.data() + c * DP * 16);
    WidenValuesB<E, C>(static_cast<const T*>(p.v) + blk, 0, 16, sc.vall.data() + c * 8 * D);
  }
  auto qh = [&](int64_t i) { return slots[i / G] * p.H + h * G + i % G; };  // query i's (slot, head) index
  float* s = sc.row.data();  // query i's scores, then probabilities, at s + i * nk
  for (int64_t i = 0; i < nq;) {  // 8 queries x 2 pages, 4 x 4 or 1 x 8 a call: 16 or 8 chains
    const int64_t m = nq - i >= 8 ? 8 : nq - i >= 4 ? 4 : 1, npg = m == 8 ? 2 : m == 4 ? 4 : 8;
    const uint32_t* q[8];
    float* sp[8];
    for (int64_t c = 0; c < np;) {
      const int64_t g = np - c >= npg ? npg : 1;
      for (int64_t x = 0; x < m; ++x) {
        q[x] = sc.qb.data() + qh(i + x) * DP;
        sp[x] = s + (i + x) * nk + c * S;
      }
      const uint32_t* kt = sc.kall.data() + c * DP * 16;
      if (m == 8) g == 2 ? ScoresPagesTB<8, 2>(q, kt, D, sp) : ScoresTB<8, 1>(q, kt, D, sp);
      else if (m == 4) g == 4 ? ScoresPagesTB<4, 4>(q, kt, D, sp) : ScoresTB<4, 2>(q, kt, D, sp);
      else g == 8 ? ScoresPagesTB<1, 8>(q, kt, D, sp) : ScoresTB<1, 8>(q, kt, D, sp);
      c += g;
    }
    i += m;
  }
  uint32_t* pb = sc.pairs.data();  // query i's probabilities as bfloat16 pairs at pb + i * nk / 2
  for (int64_t i = 0; i < nq; ++i) {
    float* st = states + pc.state + i * W;  // slot i / G's state block, query i % G
    st[1] = SoftmaxAll(s + i * nk, nk, p.sm_scale, p.soft_cap, &st[0]);
    for (int64_t j = 0; j < nk; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + i * nk / 2 + j / 2), ToBF16(_mm512_loadu_ps(s + i * nk + j)));
  }
  constexpr int kq = C <= 4 ? 4 : 2;  // queries a ValuesAllTB call: kq x C accumulators of 32 registers
  for (int64_t i = 0; i < nq;) {
    const int64_t m = nq - i >= kq ? kq : 1;
    float* out[kq];
    const uint32_t* pp[kq];
    for (int64_t x = 0; x < m; ++x) {
      out[x] = states + pc.state + (i + x) * W + 2;
      pp[x] = pb + (i + x) * nk / 2;
    }
    if (m == kq) ValuesAllTB<C, kq>(out, pp, sc.vall.data(), np);
    else ValuesAllTB<C, 1>(out, pp, sc.vall.data(), np);
    i += m;
  }
  return true;
}
#endif

// SharedPieceB for this problem where there is one (the `bf16` attribute, AVX512-BF16, pages of 16, D = 64 or 128)
template <typename E>
using SharedFn = bool (*)(const Problem&, Scratch&, const Piece&, const int64_t*, int64_t, float*);

template <typename E>
SharedFn<E> PickShared(const Problem& p) {
#if defined(__AVX512BF16__)
  if (p.bf16 && p.S == 16 && p.D == 64) return &SharedPieceB<E, 4>;
  if (p.bf16 && p.S == 16 && p.D == 128) return &SharedPieceB<E, 8>;
#endif
  (void)p;
  return nullptr;
}

// RunShared's units: each run's pages in ranges (enough for kSplitUnitsPerThread units a thread, each of 8-32
// pages) a KV head; then every decode row's own keys past its run's pages (in ranges of at most kOwnRangePages
// pages) and every block row's keys past its run's pages, a KV head; the units the longest first. Each unit's states
// go at its `state` offset, and each (query slot, KV head)'s states' offsets to slots [(q * KV + h) * per, +
// n_slots[q * KV + h]). Returns the floats the states take, or -1 where a decode row's own keys are more than the
// two-pass form keeps.
constexpr int64_t kOwnRangePages = 32;

int64_t PlanShared(const Problem& p, const std::vector<SharedRun>& runs, const std::vector<int64_t>& order,
                   int64_t threads, std::vector<Piece>& pieces, std::vector<int64_t>& slots,
                   std::vector<int64_t>& n_slots, int64_t& per) {
  const int64_t G = p.G, W = p.D + 2, S = p.S, Q = p.R * p.Bq;
  const int64_t target = (kSplitUnitsPerThread * threads + p.KV - 1) / p.KV;
  auto ranges = [&](int64_t pages) {
    const int64_t fewest = (pages + kOwnRangePages - 1) / kOwnRangePages;  // none over kOwnRangePages pages
    return std::max<int64_t>({1, std::min(target, pages / kSharedRangePages), fewest});
  };
  std::vector<int64_t> shared(p.R, 0);  // each row's pages computed in its run
  int64_t most = 1;
  for (const SharedRun& run : runs) {
    most = std::max(most, ranges(run.pages));
    for (int64_t i = 0; i < run.n; ++i) shared[order[run.first + i] / p.Bq] = run.pages;
  }
  per = most + (p.Bq == 1 ? (p.P + kOwnRangePages - 1) / kOwnRangePages : 1);  // a query's most states a KV head
  slots.assign(Q * p.KV * per, 0);
  n_slots.assign(Q * p.KV, 0);
  int64_t size = 0;
  auto add = [&](int64_t q, int64_t h, int64_t off) { slots[(q * p.KV + h) * per + n_slots[q * p.KV + h]++] = off; };
  pieces.clear();
  for (size_t j = 0; j < runs.size(); ++j) {
    const SharedRun& run = runs[j];
    const int64_t k = ranges(run.pages);
    for (int64_t h = 0; h < p.KV; ++h)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t a = run.pages * i / k, b = run.pages * (i + 1) / k;
        pieces.push_back({static_cast<int64_t>(j), -1, h, a, b, size, (b - a) * S * run.n * G / 4});
        for (int64_t x = 0; x < run.n; ++x) add(order[run.first + x], h, size + x * G * W);
        size += run.n * G * W;
      }
  }
  const size_t first_own = pieces.size();
  const int64_t two_pass_max = g_two_pass_max.load(std::memory_order_relaxed);
  for (int64_t r = 0, lo, hi; r < p.R; ++r) {
    if (p.Bq > 1) {  // the whole row, from its run's pages on
      int64_t last = -1, n = 0;
      for (int64_t b = 0; b < p.Bq; ++b) {
        last = std::max<int64_t>(last, p.pos[r * p.Bq + b]);
        n += p.pos[r * p.Bq + b] >= 0;
      }
      for (int64_t h = 0; h < p.KV; ++h) {
        pieces.push_back({kBlockKeys, r, h, shared[r] * S, last, size, (last + 1 - shared[r] * S) * n * G});
        for (int64_t b = 0; b < p.Bq; ++b)
          if (p.pos[r * p.Bq + b] >= 0) add(r * p.Bq + b, h, size + b * G * W);  // padding: no state, zeros
        size += p.Bq * G * W;
      }
      continue;
    }
    DecodeKeys(p, r, lo, hi);
    lo = std::max(lo, shared[r] * S);
    for (int64_t a = lo; a <= hi;) {  // page-aligned ranges of at most kOwnRangePages pages
      const int64_t e = std::min(hi, (a / S + kOwnRangePages) * S - 1);
      if ((e - a + 16) * G > two_pass_max) return -1;  // the online form's row: not this path
      for (int64_t h = 0; h < p.KV; ++h) {
        pieces.push_back({kOwnKeys, r, h, a, e, size, (e - a + 1) * G});
        add(r, h, size);
        size += G * W;
      }
      a = e + 1;
    }
  }
  std::stable_sort(pieces.begin() + first_own, pieces.end(),
                   [](const Piece& a, const Piece& b) { return a.work > b.work; });
  return size;
}

// The problem with its shared pages computed once a run (see g_shared_min_pages): decode rows sharing leading pages
// (SharedRuns) or block rows over a cached prefix (BlockRuns); the rest as Unit and RowRangeState would, as partial
// states; then one merge per query. False, having done nothing, where no run qualifies (or the build has no
// SharedPieceB for the problem, or a decode row's own keys are more than the two-pass form keeps).
template <typename E>
bool RunShared(ffi::ThreadPool& pool, const Problem& p, std::atomic<bool>& bad_page, PageFn<E> page_fn,
               BlockFn<E> block_fn, RowFn row_fn, int64_t threads) {
  const int64_t min_pages = g_shared_min_pages.load(std::memory_order_relaxed);
  const SharedFn<E> shared_fn = PickShared<E>(p);
  if (min_pages <= 0 || !shared_fn || (p.Bq == 1 ? !row_fn || p.R < kSharedMinRows : !block_fn)) return false;
  std::vector<int64_t> order, slots, n_slots;
  const std::vector<SharedRun> runs = p.Bq == 1 ? SharedRuns(p, min_pages, order) : BlockRuns(p, min_pages, order);
  if (runs.empty()) return false;
  std::vector<Piece> pieces;
  int64_t per = 0;
  const int64_t size = PlanShared(p, runs, order, threads, pieces, slots, n_slots, per);
  if (size < 0) return false;
  const int64_t G = p.G, D = p.D, W = D + 2;
  thread_local std::vector<float> state;  // every unit writes all its states: kept from call to call, not zeroed
  Scratch::Grow(state, size);
  float* states = state.data();
  RunUnits(pool, static_cast<int64_t>(pieces.size()), [&](int64_t u) {
    thread_local Scratch sc;
    sc.FitRows(p);
    const Piece& pc = pieces[u];
    bool ok;
    if (pc.run >= 0) ok = shared_fn(p, sc, pc, order.data() + runs[pc.run].first, runs[pc.run].n, states);
    else if (pc.run == kOwnKeys) ok = RowRangeState(p, sc, row_fn, pc.row, pc.h, pc.lo, pc.hi, states + pc.state);
    else ok = Unit<E>(p, pc.row, pc.h, pc.h + 1, sc, page_fn, block_fn, nullptr, pc.lo, states + pc.state);
    if (!ok) bad_page.store(true);
  });
  if (bad_page.load()) return true;
  auto merge = [&](int64_t r) {  // row r's queries
    for (int64_t q = r * p.Bq; q < (r + 1) * p.Bq; ++q)
      for (int64_t h = 0; h < p.KV; ++h)
        for (int64_t g = 0; g < G; ++g)
          MergeStates(states + g * W, slots.data() + (q * p.KV + h) * per, n_slots[q * p.KV + h], D,
                      p.out + (q * p.H + h * G + g) * D);
  };
  // block rows' merges (Bq queries a row) over the threads: 1.25x a call of six 20-token chunks; decode rows' on
  // this thread: waking a helper for them cost more than they take (16-64 rows 0.7-0.8x)
  if (p.Bq > 1) RunUnits(pool, p.R, merge);
  else for (int64_t r = 0; r < p.R; ++r) merge(r);
  return true;
}

template <typename E>
void RunAll(ffi::ThreadPool& pool, const Problem& p, std::atomic<bool>& bad_page) {
  // a unit: all of a decode row's KV heads when there are rows enough to share out, else one (row, KV head). Block
  // rows (a prefill's chunks) go last row first: in a causal prefill the later chunks see the most keys, and the
  // longest units started first leave the least for one thread to finish alone.
  const int64_t heads = p.R >= kRowUnits && p.Bq == 1 ? p.KV : 1, per_row = p.KV / heads;
  const PageFn<E> page_fn = PickPage<E>(p);
  const BlockFn<E> block_fn = PickBlock<E>(p);
  const RowFn row_fn = PickRow<E>(p);
  const int64_t threads = sgl_jax_native::CallThreads(pool);
  if (RunShared<E>(pool, p, bad_page, page_fn, block_fn, row_fn, threads)) return;
  if (row_fn) {
    const int64_t k = DecodeSplits(p, threads);
    if (k > 1) return RunSplit<E>(pool, p, bad_page, row_fn, k);
  }
  RunUnits(pool, p.R * per_row, [p, heads, per_row, page_fn, block_fn, row_fn, &bad_page](int64_t u) {
    thread_local Scratch sc;
    sc.Fit(p);
    const int64_t r = p.Bq > 1 ? p.R - 1 - u / per_row : u / per_row, h0 = u % per_row * heads;
    if (!Unit<E>(p, r, h0, h0 + heads, sc, page_fn, block_fn, row_fn)) bad_page.store(true);
  });
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                              ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lens, ffi::Buffer<ffi::S32> pos,
                              ffi::ResultBuffer<ffi::F32> out, float sm_scale, int64_t window, float soft_cap,
                              int64_t bf16, int64_t fp8) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = table.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument("paged attention: q and pages must be 4-D, v like k, the table 2-D");
  // uint8 pages are a float8 pool's codes (the engine stores them so: XLA:CPU widens a whole float8 array for any
  // op but a convert), their format the `fp8` attribute: 1 e4m3fn, 2 e5m2
  ffi::DataType et = k.element_type();
  if (et == ffi::DataType::U8 && v.element_type() == et && (fp8 == 1 || fp8 == 2))
    et = fp8 == 1 ? ffi::DataType::F8E4M3FN : ffi::DataType::F8E5M2;
  else if (v.element_type() != et || fp8 != 0 ||
           (et != ffi::DataType::F32 && et != ffi::DataType::F16 && et != ffi::DataType::BF16 &&
            et != ffi::DataType::F8E4M3FN && et != ffi::DataType::F8E5M2))
    return ffi::Error::InvalidArgument(
        "paged attention: k and v pages must both be f32, f16, bf16, f8e4m3fn or f8e5m2 (or u8 codes with fp8 1, 2)");
  Problem p{q.typed_data(), k.untyped_data(), v.untyped_data(), table.typed_data(), lens.typed_data(),
            pos.typed_data(), out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], kd[2], td[1], 0,
            sm_scale, window, soft_cap, bf16 != 0 && BF16Math()};
  if (kd[3] != p.D || p.KV == 0 || p.H % p.KV != 0 || td[0] != p.R ||
      static_cast<int64_t>(lens.element_count()) != p.R ||
      static_cast<int64_t>(pos.element_count()) != p.R * p.Bq)
    return ffi::Error::InvalidArgument("paged attention: operand shapes disagree");
  p.G = p.H / p.KV;
  std::atomic<bool> bad_page{false};
  if (et == ffi::DataType::F32) RunAll<F32Pages>(pool, p, bad_page);
  else if (et == ffi::DataType::F16) RunAll<F16Pages>(pool, p, bad_page);
  else if (et == ffi::DataType::BF16) RunAll<BF16Pages>(pool, p, bad_page);
  else if (et == ffi::DataType::F8E4M3FN) RunAll<E4M3Pages>(pool, p, bad_page);
  else RunAll<E5M2Pages>(pool, p, bad_page);
  if (bad_page.load()) return ffi::Error::InvalidArgument("paged attention: a page index is outside the pool");
  return ffi::Error::Success();
}

}  // namespace

// 1 where block rows can take their dot products in bfloat16 pairs (the `bf16` attribute), else 0.
extern "C" int64_t SglJaxAttentionBF16() { return BF16Math() ? 1 : 0; }

// Whether the build has the two-pass decode rows (AVX2: 8 lanes; AVX-512: 16) and the shared-pages path (AVX-512;
// its loops take effect with AVX512-BF16)
#if defined(__AVX2__)
constexpr bool kHasTwoPass = true;
#else
constexpr bool kHasTwoPass = false;
#endif
#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr bool kHasSharedPath = true;
#else
constexpr bool kHasSharedPath = false;
#endif

// A setting of the decode loops: `value` >= 0 sets it, a negative value only reads it. Returns the value now in
// effect, or -1 where the build has no such path (`present` false).
static int64_t Setting(std::atomic<int64_t>& setting, int64_t value, bool present) {
  if (!present) return -1;
  if (value >= 0) setting.store(value);
  return setting.load();
}

// The most scores a decode unit keeps for the two-pass form (see g_two_pass_max; 0: every unit online, a page at
// a time). -1 without AVX2 (decode rows always online, never split).
extern "C" int64_t SglJaxAttentionTwoPassMax(int64_t floats) { return Setting(g_two_pass_max, floats, kHasTwoPass); }

// The fewest keys a decode key range may have (see g_split_min_keys; 0: decode rows are never split); -1 without
// AVX2.
extern "C" int64_t SglJaxAttentionSplitMinKeys(int64_t keys) { return Setting(g_split_min_keys, keys, kHasTwoPass); }

// The fewest whole pages decode rows must share to have them computed once for all of them (see
// g_shared_min_pages; 0: every decode row reads its pages alone); -1 without AVX-512.
extern "C" int64_t SglJaxAttentionSharedMinPages(int64_t pages) {
  return Setting(g_shared_min_pages, pages, kHasSharedPath);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SglJaxPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("bf16")
                                  .Attr<int64_t>("fp8"));
