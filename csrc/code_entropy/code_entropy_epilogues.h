// Epilogues of the code_entropy CPU kernels (csrc/code_entropy/code_entropy_cpu.cpp): what each pass
// does with a tile of scores that the shared micro-kernel (common/score_kernel.h) left in an L1
// buffer, and the small GEMMs of the backward. Each is one template over a GCC vector type,
// compiled once per instruction set (KEPLER_CODE_ENTROPY_EPILOGUES), so that it runs in the vector
// width of the micro-kernel that was picked.
#pragma once

#include "common/score_kernel.h"
#include "common/simd.h"
#include "common/vector_math.h"

#include <algorithm>
#include <cstdint>
#include <limits>

// Vector arguments and results never cross a call (the helpers are forced inline), so GCC's note
// that they would change the call ABI without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kepler {
namespace code_entropy_detail {

using score::load;
using score::splat;
using score::store;

constexpr float kInf = std::numeric_limits<float>::infinity();

template <typename V>
struct IntVec;
template <>
struct IntVec<score::f32x4> {
  typedef int32_t type __attribute__((vector_size(16)));
};
template <>
struct IntVec<score::f32x8> {
  typedef int32_t type __attribute__((vector_size(32)));
};
template <>
struct IntVec<score::f32x16> {
  typedef int32_t type __attribute__((vector_size(64)));
};
template <typename V>
using ivec_t = typename IntVec<V>::type;


// exp(x) for x <= 0 (larger x is clamped to 0), branch-free (std::exp does not vectorize without
// -ffast-math): Cephes expf, ~2 ulp; exactly 0 below log(FLT_MIN), so a term that underflows adds
// exactly 0; NaN stays NaN.
template <typename V>
KEPLER_FORCE_INLINE V exp_nonpositive(V x) {
  using I = ivec_t<V>;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kMinArg = -87.3365447f;
  const I underflow = x < kMinArg;
  V xc = x > 0.0f ? splat<V>(0.0f) : x;
  xc = xc < kMinArg ? splat<V>(kMinArg) : xc;
  const I n = __builtin_convertvector(xc * kLog2e - 0.5f, I);  // round to nearest (xc <= 0)
  const V p = cephes_exp_reduced(xc, __builtin_convertvector(n, V));
  return underflow ? splat<V>(0.0f) : p * (V)((n + 127) << 23);
}

template <typename V>
KEPLER_FORCE_INLINE float sum_lanes(V v) {
  float total = 0.f;
  for (int64_t l = 0; l < score::kLanes<V>; ++l) total += v[l];
  return total;
}

// Lanes [0, count) set (count < lanes): masks the last, partial vector of a code block.
template <typename V>
KEPLER_FORCE_INLINE ivec_t<V> first_lanes(int64_t count) {
  ivec_t<V> lane;
  for (int64_t l = 0; l < score::kLanes<V>; ++l) lane[l] = static_cast<int32_t>(l);
  return lane < static_cast<int32_t>(count);
}

// What an epilogue reads and writes for one tile: scores[r * ld + k] for rows r < rows and codes
// k < codes (the block's real codes; `padded_codes` with the padding), and the per-row and per-code
// arrays of the pass, offset to the tile's first row and code.
struct Tile {
  float* scores;
  int64_t ld, rows, codes, padded_codes;
  float alpha;
  float* row_min;                  // min pass: running minimum (NaN once a NaN was seen)
  float* row_bad;                  // min pass: sum of c - c, NaN once a score was not finite
  double *row_l, *row_s;           // stats pass: l and sum t exp(-t)
  const float *log_l, *entropy;    // mass and gradient passes (row_min is c_min there)
  const int32_t* row_ok;           // mass pass: the row's scores are finite
  float* mass;                     // mass pass: column sums of p; code pass: column sums of G
  const float* w;                  // gradient passes: w_k (0 on the padding codes)
  float gs_n, gb_n;                // g_s / N and g_b / N
  double* r_sum;                   // r_n pass: sum_k p w_k (and sum_k p in row_s)
  const float *r_n, *r_n_lo;       // gradient passes: r_n = r_n + r_n_lo
};

template <typename V>
KEPLER_FORCE_INLINE void min_pass_body(const Tile& t) {
  constexpr int64_t L = score::kLanes<V>;
  const int64_t full = t.codes / L * L;
  for (int64_t r = 0; r < t.rows; ++r) {
    const float* c_row = t.scores + r * t.ld;
    V m = splat<V>(t.row_min[r]), bad = splat<V>(0.f);
    for (int64_t k = 0; k < full; k += L) {
      const V c = load<V>(c_row + k);
      m = (c < m) | (c != c) ? c : m;  // a NaN sticks
      bad += c - c;
    }
    if (full < t.codes) {
      const ivec_t<V> real = first_lanes<V>(t.codes - full);
      const V c = load<V>(c_row + full);
      const V c_min = real ? c : splat<V>(kInf);
      m = (c_min < m) | (c_min != c_min) ? c_min : m;
      const V c_bad = real ? c : splat<V>(0.f);
      bad += c_bad - c_bad;
    }
    float row_min = m[0];
    for (int64_t l = 1; l < L; ++l) row_min = (m[l] < row_min) || (m[l] != m[l]) ? m[l] : row_min;
    t.row_min[r] = (row_min != row_min) ? row_min : std::min(row_min, t.row_min[r]);
    t.row_bad[r] += sum_lanes(bad);
  }
}

template <typename V>
KEPLER_FORCE_INLINE void stats_pass_body(const Tile& t) {
  constexpr int64_t L = score::kLanes<V>;
  for (int64_t r = 0; r < t.rows; ++r) {
    const float* c_row = t.scores + r * t.ld;
    const V c_min = splat<V>(t.row_min[r]);
    // l = (number of codes at the minimum, each adding exactly 1) + (the sum of the others), kept
    // apart so that the small terms of a nearly one-hot row are not lost against the 1 in float32.
    V ties = splat<V>(0.f), l_sum = splat<V>(0.f), s_sum = splat<V>(0.f);
    for (int64_t k = 0; k < t.codes; k += L) {
      const V shifted = (load<V>(c_row + k) - c_min) * t.alpha;
      V e = exp_nonpositive(-shifted);
      V tie = shifted == 0.f ? splat<V>(1.f) : splat<V>(0.f);
      if (k + L > t.codes) {
        const ivec_t<V> real = first_lanes<V>(t.codes - k);
        e = real ? e : splat<V>(0.f);
        tie = real ? tie : splat<V>(0.f);
      }
      ties += tie;
      l_sum += shifted > 0.f ? e : splat<V>(0.f);
      s_sum += e > 0.f ? shifted * e : splat<V>(0.f);  // never 0 * inf
    }
    t.row_l[r] += static_cast<double>(sum_lanes(ties)) + sum_lanes(l_sum);
    t.row_s[r] += sum_lanes(s_sum);
  }
}

// Column sums over the tile's finite rows; the padding codes' sums land past K and are never read.
template <typename V>
KEPLER_FORCE_INLINE void mass_pass_body(const Tile& t) {
  constexpr int64_t L = score::kLanes<V>;
  for (int64_t k = 0; k < t.padded_codes; k += L) {
    V sum = load<V>(t.mass + k);
    for (int64_t r = 0; r < t.rows; ++r) {
      if (!t.row_ok[r]) continue;
      const V shifted = (load<V>(t.scores + r * t.ld + k) - t.row_min[r]) * t.alpha;
      sum += exp_nonpositive(-shifted - t.log_l[r]);
    }
    store<V>(t.mass + k, sum);
  }
}

// p and G of one vector of codes of row r: G = -(p / N)(g_s (log p + H) + g_b (w - r_n)), the
// reference's formula term by term (a one-hot row gets exactly G = 0), and G = 0 where p = 0
// (never 0 * inf; w_k is 0 for an unused code); NaN stays NaN. The padding codes get p = G = 0. r_n = r_hi + r_lo (float64
// split in two floats): w - r_n of the winner of a nearly one-hot row is far below float32's
// rounding of r_n and would otherwise come out 0.
template <typename V>
KEPLER_FORCE_INLINE void gradient_terms(const Tile& t, int64_t r, int64_t k, float r_hi, float r_lo, V& p, V& g) {
  const V shifted = (load<V>(t.scores + r * t.ld + k) - t.row_min[r]) * t.alpha;
  const V log_p = -shifted - t.log_l[r];
  p = exp_nonpositive(log_p);
  if (k + score::kLanes<V> > t.codes) p = first_lanes<V>(k < t.codes ? t.codes - k : 0) ? p : splat<V>(0.f);
  const V w_minus_r = (load<V>(t.w + k) - r_hi) - r_lo;
  g = p * (-t.gs_n * (log_p + t.entropy[r]) - t.gb_n * w_minus_r);
  // p = 0 gives 0, or NaN where w or r_n is (a group whose masses are NaN: the reference's gradient
  // of its batch entropy is NaN for every code, and its exp backward multiplies that by p = 0).
  g = p == 0.f ? w_minus_r * 0.f : g;
}

// r_n = sum_k p w_k and sum_k p of the tile's rows (p = 0 terms add 0). The codes at the minimum
// (t = 0, all with the same p0 = exp(-log l)) are summed apart, as sum w and a count, and the rest
// in float lanes; the caller takes r_n / sum p in float64 (1 up to the rounding of p). So a nearly
// one-hot row keeps its small terms next to the winner's w, and a row tied between codes of equal
// w gets w - r_n = 0 and G = 0 exactly, as the reference's softmax gradient does.
template <typename V>
KEPLER_FORCE_INLINE void r_sum_pass_body(const Tile& t) {
  constexpr int64_t L = score::kLanes<V>;
  for (int64_t r = 0; r < t.rows; ++r) {
    const V c_min = splat<V>(t.row_min[r]);
    V top_w = splat<V>(0.f), top_count = splat<V>(0.f), pw_sum = splat<V>(0.f), p_sum = splat<V>(0.f);
    for (int64_t k = 0; k < t.padded_codes; k += L) {
      V p, g;
      gradient_terms(t, r, k, 0.f, 0.f, p, g);
      const auto top = load<V>(t.scores + r * t.ld + k) == c_min;  // the padding codes have p = 0
      const V w = load<V>(t.w + k);
      const auto counted = top & (p != 0.f);
      top_w += counted ? w : splat<V>(0.f);
      top_count += counted ? splat<V>(1.f) : splat<V>(0.f);
      const auto rest = ~top & (p != 0.f);
      pw_sum += rest ? p * w : splat<V>(0.f);
      p_sum += rest ? p : splat<V>(0.f);
    }
    const double p0 = exp_nonpositive(splat<V>(-t.log_l[r]))[0];  // the p of a code at the minimum
    double w_total = 0.0, count = 0.0, pw_total = 0.0, p_total = 0.0;
    for (int64_t l = 0; l < L; ++l) {
      w_total += top_w[l];
      count += top_count[l];
      pw_total += pw_sum[l];
      p_total += p_sum[l];
    }
    t.r_sum[r] += p0 * w_total + pw_total;
    t.row_s[r] += p0 * count + p_total;
  }
}

// G in place of the scores, with its column sums added to t.mass when kColumnSums.
template <typename V, bool kColumnSums>
KEPLER_FORCE_INLINE void gradient_pass_body(const Tile& t) {
  constexpr int64_t L = score::kLanes<V>;
  for (int64_t k = 0; k < t.padded_codes; k += L) {
    V sum = splat<V>(0.f);
    for (int64_t r = 0; r < t.rows; ++r) {
      V p, g;
      gradient_terms(t, r, k, t.r_n[r], t.r_n_lo[r], p, g);
      store<V>(t.scores + r * t.ld + k, g);
      sum += g;
    }
    if (kColumnSums) store<V>(t.mass + k, load<V>(t.mass + k) + sum);
  }
}

// out[i][0:dpad) += sum_{j < J} C[i * si + j * sj] * M[j * ldm + 0:dpad) for i < I (dpad a
// multiple of the lanes): blocks of 3 rows of out x up to 4 vectors stay in registers (12
// accumulators, 3 broadcasts and one load of M live: 16 registers) per sweep over j.
struct Gemm {
  float* out;
  int64_t ldo, I, dpad;
  const float* C;
  int64_t si, sj;
  const float* M;
  int64_t ldm, J;
};

template <typename V, typename Broadcast, int kRows, int kVecs>
KEPLER_FORCE_INLINE void gemm_chunk(const Gemm& g, int64_t i0, int64_t d0) {
  constexpr int64_t L = score::kLanes<V>;
  V acc[kRows][kVecs];
#pragma GCC unroll 3
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[i][v] = load<V>(g.out + (i0 + i) * g.ldo + d0 + v * L);
  }
  const float* c = g.C + i0 * g.si;
  for (int64_t j = 0; j < g.J; ++j) {
    V coef[kRows];
#pragma GCC unroll 3
    for (int i = 0; i < kRows; ++i) coef[i] = Broadcast::template load<V>(c + i * g.si + j * g.sj);
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const V m = load<V>(g.M + j * g.ldm + d0 + v * L);
#pragma GCC unroll 3
      for (int i = 0; i < kRows; ++i) acc[i][v] += coef[i] * m;
    }
  }
#pragma GCC unroll 3
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) store<V>(g.out + (i0 + i) * g.ldo + d0 + v * L, acc[i][v]);
  }
}

template <typename V, typename Broadcast, int kRows>
KEPLER_FORCE_INLINE void gemm_rows(const Gemm& g, int64_t i0) {
  constexpr int64_t L = score::kLanes<V>;
  for (int64_t d0 = 0; d0 < g.dpad; d0 += 4 * L) {
    switch (std::min<int64_t>(4, (g.dpad - d0) / L)) {
      case 4: gemm_chunk<V, Broadcast, kRows, 4>(g, i0, d0); break;
      case 3: gemm_chunk<V, Broadcast, kRows, 3>(g, i0, d0); break;
      case 2: gemm_chunk<V, Broadcast, kRows, 2>(g, i0, d0); break;
      default: gemm_chunk<V, Broadcast, kRows, 1>(g, i0, d0); break;
    }
  }
}

template <typename V, typename Broadcast>
KEPLER_FORCE_INLINE void gemm_body(const Gemm& g) {
  int64_t i0 = 0;
  for (; i0 + 3 <= g.I; i0 += 3) gemm_rows<V, Broadcast, 3>(g, i0);
  if (g.I - i0 == 2) gemm_rows<V, Broadcast, 2>(g, i0);
  if (g.I - i0 == 1) gemm_rows<V, Broadcast, 1>(g, i0);
}

// The epilogues of one instruction set.
struct Epilogues {
  int64_t lanes;
  void (*min_pass)(const Tile&);
  void (*stats_pass)(const Tile&);
  void (*mass_pass)(const Tile&);
  void (*r_sum_pass)(const Tile&);
  void (*gradient_pass)(const Tile&);
  void (*gradient_sums_pass)(const Tile&);
  void (*gemm)(const Gemm&);
};

#define KEPLER_CODE_ENTROPY_EPILOGUES(NAME, TARGET, V, B)                                  \
  inline TARGET void min_pass_##NAME(const Tile& t) { min_pass_body<V>(t); }                      \
  inline TARGET void stats_pass_##NAME(const Tile& t) { stats_pass_body<V>(t); }                  \
  inline TARGET void mass_pass_##NAME(const Tile& t) { mass_pass_body<V>(t); }                    \
  inline TARGET void r_sum_pass_##NAME(const Tile& t) { r_sum_pass_body<V>(t); }                 \
  inline TARGET void gradient_pass_##NAME(const Tile& t) { gradient_pass_body<V, false>(t); }     \
  inline TARGET void gradient_sums_pass_##NAME(const Tile& t) { gradient_pass_body<V, true>(t); } \
  inline TARGET void gemm_##NAME(const Gemm& g) { gemm_body<V, B>(g); }                              \
  constexpr Epilogues kEpilogues_##NAME = {score::kLanes<V>, &min_pass_##NAME,             \
                                           &stats_pass_##NAME, &mass_pass_##NAME,          \
                                           &r_sum_pass_##NAME, &gradient_pass_##NAME,      \
                                           &gradient_sums_pass_##NAME,                     \
                                           &gemm_##NAME};

KEPLER_CODE_ENTROPY_EPILOGUES(portable, , score::f32x4, score::PlainBroadcast)
#if KEPLER_X86
KEPLER_CODE_ENTROPY_EPILOGUES(avx2, KEPLER_TARGET_AVX2, score::f32x8, score::AsmBroadcast)
KEPLER_CODE_ENTROPY_EPILOGUES(avx512, KEPLER_TARGET_AVX512, score::f32x16, score::AsmBroadcast)
KEPLER_CODE_ENTROPY_EPILOGUES(avx512_emulated, KEPLER_TARGET_AVX2, score::f32x16, score::PlainBroadcast)
#endif
#undef KEPLER_CODE_ENTROPY_EPILOGUES

inline Epilogues epilogues_for(score::Isa isa) {
#if KEPLER_X86
  switch (isa) {
    case score::Isa::kAvx2: return kEpilogues_avx2;
    case score::Isa::kAvx512: return kEpilogues_avx512;
    case score::Isa::kAvx512Emulated: return kEpilogues_avx512_emulated;
    default: break;
  }
#endif
  return kEpilogues_portable;
}

}  // namespace code_entropy_detail
}  // namespace kepler
