// Fused Kepler KL regularizer on the CPU: per row, standardize, softmax, and
// sum_i p_i * log(p_i / q_i + eps), without materializing any (B, M) intermediate.
//
// Passes over a row (fp32 math, fp64 accumulation across blocks of kBlock elements):
//   forward:  (1) mean / M2 (Chan's merge of per-block two-pass moments), max, min
//             (2) sum of exp(u), u = s - max s = (x - max x) / scale  -> logsumexp of u
//             (3) sum of p_i * log(p_i / q_i + eps)
//   backward: (1) sum p, sum p g, sum p s, sum p s g, sum s   (g = dL/dp, s = u - pivot, below)
//             (2) write dL/dx
// Everything is computed from u, never from s = (x - mean) / scale: in official mode s grows as
// 1 / scale (|s| ~ 1e10 for x ~ 1e-10), and s - logsumexp(s) then loses the O(1) log-probabilities
// to s's rounding (and FMA contraction of (x - mean) * inv - shift adds an unrounded product to a
// rounded one): the loss exploded to inf. u is exactly 0 at the max and its error is relative to
// |u|, where exp(u) has long underflowed. The gradient is invariant to the shift (sum_i d_i = 0).
// Rows are spread over threads; when there are fewer rows than threads a long row is cut into
// chunks whose partial sums are combined per row between passes (two-level reduction).
// The math (standardization rule for degenerate rows, gradient formula) is documented in
// kepler/ops/kepler_kl.py; kepler/reference/kepler_kl.py is the spec.
#include "kepler_kl/kepler_kl_checks.h"
#include "common/dispatch.h"
#include "common/simd.h"
#include "common/vector_math.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace kepler {
namespace {

// Elements handled at a time: converted to fp32 (bf16/fp16 inputs) into an L1-resident buffer.
constexpr int64_t kBlock = 512;
// Smallest piece of a row worth its own task when a row is split across threads.
constexpr int64_t kMinChunk = 32768;

// Without -fno-trapping-math GCC will not if-convert the selects in exp/log below, and the loops
// stay scalar; FP exceptions are never inspected here, so the block kernels are built without it.
// Their helpers are forced inline (KEPLER_FORCE_INLINE): GCC does not inline across an options
// mismatch (a libm call such as std::fabs in the loop would stay a call and stop vectorization).
// The block loops are compiled twice, for AVX2+FMA and for the baseline (KEPLER_TARGET_CLONES):
// the exp/log below vectorize 8 wide on AVX2.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

KEPLER_FORCE_INLINE float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

KEPLER_FORCE_INLINE int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(x), branch-free so that loops over it vectorize (the libm call does not without
// -ffast-math). Cephes' expf polynomial, about 2 ulp; 0 below -87.3 (the subnormal range),
// NaN propagates.
KEPLER_FORCE_INLINE float vec_abs(float x) { return bits_to_float(float_to_bits(x) & 0x7fffffff); }

KEPLER_FORCE_INLINE float vec_exp(float x) {
  constexpr float kLow = -87.3f;
  constexpr float kHigh = 88.0f;
  constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2**23: adding it rounds to an integer
  float clamped = x < kLow ? kLow : x;
  clamped = clamped > kHigh ? kHigh : clamped;
  const float shifted = clamped * 1.44269504088896341f + kRoundShift;
  const float n = shifted - kRoundShift;
  const int32_t n_int = float_to_bits(shifted) - float_to_bits(kRoundShift);
  const float result = cephes_exp_reduced(clamped, n) * bits_to_float((n_int + 127) << 23);
  return x < kLow ? 0.0f : result;
}

// log(x) for positive normal x, branch-free (Cephes' logf polynomial, about 1 ulp).
KEPLER_FORCE_INLINE float vec_log(float x) {
  const int32_t bits = float_to_bits(x);
  const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f800000;  // the mantissa as a float in [1, 2)
  // Above sqrt(2): halve it (one less in the float's exponent field) and count one more power of 2.
  const int32_t upper = static_cast<int32_t>(bits_to_float(mantissa_bits) > 1.41421356f);
  const float mantissa = bits_to_float(mantissa_bits - (upper << 23));
  const float e = static_cast<float>((bits >> 23) - 127 + upper);
  const float f = mantissa - 1.0f;  // in [sqrt(1/2) - 1, sqrt(2) - 1]
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}

// log(r + eps) and r / (r + eps) from log_ratio = log r and log_eps = log eps, without forming r
// (which overflows when q is tiny): log(r + eps) = max(a, b) + log(1 + exp(-|a - b|)).
struct EpsTerm {
  float log_ratio_eps;  // log(r + eps)
  float ratio_share;    // r / (r + eps)
};

KEPLER_FORCE_INLINE EpsTerm eps_term(float log_ratio, float log_eps) {
  const float diff = log_ratio - log_eps;
  const float e = vec_exp(-vec_abs(diff));
  const float one_plus = 1.0f + e;
  EpsTerm term;
  // log1p(e) as log(1 + e) * e / ((1 + e) - 1): exact to fp32 rounding even for tiny e.
  const float rounded_e = one_plus - 1.0f;
  const float correction = e / (rounded_e == 0.0f ? 1.0f : rounded_e);
  const float log1p_e = rounded_e == 0.0f ? e : vec_log(one_plus) * correction;
  term.log_ratio_eps = (log_ratio > log_eps ? log_ratio : log_eps) + log1p_e;
  term.ratio_share = (diff >= 0.0f ? 1.0f : e) / one_plus;
  return term;
}

// ---- block kernels (fp32 data, fp32 accumulation over at most kBlock elements) ----

struct BlockMoments {
  float mean;
  double m2;
  float max, min;
};

KEPLER_TARGET_CLONES BlockMoments block_moments(const float* x, int64_t n) {
  float sum = 0.0f, hi = x[0], lo = x[0];
#pragma omp simd reduction(+ : sum) reduction(max : hi) reduction(min : lo)
  for (int64_t i = 0; i < n; ++i) {
    sum += x[i];
    hi = x[i] > hi ? x[i] : hi;
    lo = x[i] < lo ? x[i] : lo;
  }
  const float mean = sum / static_cast<float>(n);
  // Squares of deviations near 1e19 overflow fp32 and those near 1e-20 sink into its subnormals:
  // they are summed at the power of two 2**-e that brings the block's largest |value| near 1
  // (exact), and M2 scaled back in double. e >= -126 keeps 2**-e a float.
  const float largest = std::max(std::fabs(hi), std::fabs(lo));
  int exponent = 0;
  if (std::isfinite(largest) && largest > 0.0f) std::frexp(largest, &exponent);
  exponent = std::max(exponent, -126);
  const float down = std::ldexp(1.0f, -exponent);
  float m2 = 0.0f;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) {
    const float d = (x[i] - mean) * down;
    m2 += d * d;
  }
  return {mean, std::ldexp(static_cast<double>(m2), 2 * exponent), hi, lo};
}

KEPLER_TARGET_CLONES float block_sum_exp(const float* x, int64_t n, float hi, float inv_scale) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += vec_exp((x[i] - hi) * inv_scale);
  return acc;
}

// log(p_i / q_i + eps); kHasEps is a template argument so that each loop has no branch in it.
template <bool kHasEps>
KEPLER_FORCE_INLINE float loss_term(float log_ratio, float log_eps) {
  if constexpr (kHasEps) {
    return eps_term(log_ratio, log_eps).log_ratio_eps;
  } else {
    return log_ratio;
  }
}

// dL/dp_i = log(r_i + eps) + r_i / (r_i + eps), r_i = p_i / q_i.
template <bool kHasEps>
KEPLER_FORCE_INLINE float dloss_dp(float log_ratio, float log_eps) {
  if constexpr (kHasEps) {
    const EpsTerm term = eps_term(log_ratio, log_eps);
    return term.log_ratio_eps + term.ratio_share;
  } else {
    return log_ratio + 1.0f;
  }
}

template <bool kHasEps>
KEPLER_TARGET_CLONES float block_loss(const float* x, const float* logq, int64_t n, float hi, float inv_scale,
                                  float lse, float log_eps) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float log_p = (x[i] - hi) * inv_scale - lse;
    acc += vec_exp(log_p) * loss_term<kHasEps>(log_p - logq[i], log_eps);
  }
  return acc;
}

struct GradSums {
  float p, pg, ps, psg, s;
};

template <bool kHasEps>
KEPLER_TARGET_CLONES GradSums block_grad_sums(const float* x, const float* logq, int64_t n, float hi,
                                          float inv_scale, float lse, float pivot, float log_eps) {
  float sp = 0.0f, spg = 0.0f, sps = 0.0f, spsg = 0.0f, ss = 0.0f;
#pragma omp simd reduction(+ : sp, spg, sps, spsg, ss)
  for (int64_t i = 0; i < n; ++i) {
    const float u = (x[i] - hi) * inv_scale;
    const float p = vec_exp(u - lse);
    const float g = dloss_dp<kHasEps>(u - lse - logq[i], log_eps);
    const float s = u - pivot;
    sp += p;
    spg += p * g;
    sps += p * s;
    spsg += p * s * g;
    ss += s;
  }
  return {sp, spg, sps, spsg, ss};
}

// grad_i = coef_p * p_i * (g_i - g_mean) - coef_s * (s_i - s_mean)
template <bool kHasEps>
KEPLER_TARGET_CLONES void block_grad(const float* x, const float* logq, int64_t n, float hi, float inv_scale,
                                 float lse, float pivot, float log_eps, float coef_p, float g_mean, float coef_s, float s_mean,
                                 float* grad) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = (x[i] - hi) * inv_scale;
    const float p = vec_exp(u - lse);
    const float g = dloss_dp<kHasEps>(u - lse - logq[i], log_eps);
    const float s = u - pivot;
    grad[i] = coef_p * p * (g - g_mean) - coef_s * (s - s_mean);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// ---- row pieces: [begin, end) of one row, any input dtype, fp64 accumulation across blocks ----

// Calls fn(offset, n, fp32 pointer) for each block of x[begin:end).
template <typename scalar_t, typename Fn>
void for_each_block(const scalar_t* x, int64_t begin, int64_t end, Fn&& fn) {
  float buffer[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    if constexpr (std::is_same_v<scalar_t, float>) {
      fn(start, n, x + start);
    } else {
      for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[start + i]);
      fn(start, n, static_cast<const float*>(buffer));
    }
  }
}

struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;
  float max = -std::numeric_limits<float>::infinity();
  float min = std::numeric_limits<float>::infinity();

  // Chan et al.'s pairwise update: exact merge of two (count, mean, M2) summaries.
  void merge(double other_count, double other_mean, double other_m2, float other_max, float other_min) {
    if (other_count == 0.0) return;
    const double total = count + other_count;
    const double delta = other_mean - mean;
    mean += delta * other_count / total;
    m2 += other_m2 + delta * delta * count * other_count / total;
    count = total;
    max = std::max(max, other_max);
    min = std::min(min, other_min);
  }
  void merge(const Moments& other) { merge(other.count, other.mean, other.m2, other.max, other.min); }
};

template <typename scalar_t>
Moments row_moments(const scalar_t* x, int64_t begin, int64_t end) {
  Moments moments;
  for_each_block(x, begin, end, [&](int64_t, int64_t n, const float* xf) {
    const BlockMoments block = block_moments(xf, n);
    moments.merge(static_cast<double>(n), block.mean, block.m2, block.max, block.min);
  });
  return moments;
}

// Smallest divisor of a non-degenerate row, 2**-126 (fp32's smallest normal number, so that its
// inverse is finite): the reference's MIN_DIVISOR_EXPONENT, which says why.
constexpr float kMinScale = std::numeric_limits<float>::min();

// What the passes after the moments need about a row.
struct RowParams {
  float hi;         // row max: u = (x - hi) * inv_scale
  float scale;      // divisor (variance or std); 0 for a degenerate row (standardizes to 0)
  float inv_scale;  // 1 / scale, 0 for a degenerate row
};

inline float inverse_scale(float scale) { return scale == 0.0f ? 0.0f : 1.0f / scale; }

RowParams row_params(const Moments& moments, int64_t num_cols, bool use_std) {
  // M2 / max(M - 1, 1), as the reference: M2 is 0 for one finite element and NaN for a NaN one.
  const double variance = moments.m2 / static_cast<double>(std::max<int64_t>(num_cols - 1, 1));
  float scale = static_cast<float>(use_std ? std::sqrt(variance) : variance);
  // One element or all elements equal: s = 0 (uniform softmax). A NaN row (M == 1 included)
  // keeps its NaN scale, so the loss and the gradient are NaN.
  const bool degenerate = !std::isnan(scale) && (num_cols == 1 || moments.max == moments.min);
  // Any other row has a variance > 0 that may be below fp32's normal range (values below ~1e-19):
  // floored at the smallest normal float so that 1 / scale stays finite (see kMinScale).
  scale = degenerate ? 0.0f : (scale < kMinScale ? kMinScale : scale);  // NaN stays NaN
  RowParams params;
  params.hi = moments.max;
  params.scale = scale;
  params.inv_scale = inverse_scale(scale);
  return params;
}

template <typename scalar_t>
double row_sum_exp(const scalar_t* x, int64_t begin, int64_t end, const RowParams& params) {
  double acc = 0.0;
  for_each_block(x, begin, end, [&](int64_t, int64_t n, const float* xf) {
    acc += block_sum_exp(xf, n, params.hi, params.inv_scale);
  });
  return acc;
}

template <typename scalar_t>
double row_loss(const scalar_t* x, const float* logq, int64_t begin, int64_t end, const RowParams& params,
                float lse, float log_eps, bool has_eps) {
  double acc = 0.0;
  for_each_block(x, begin, end, [&](int64_t start, int64_t n, const float* xf) {
    acc += has_eps ? block_loss<true>(xf, logq + start, n, params.hi, params.inv_scale, lse, log_eps)
                   : block_loss<false>(xf, logq + start, n, params.hi, params.inv_scale, lse, log_eps);
  });
  return acc;
}

struct GradTotals {
  double p = 0.0, pg = 0.0, ps = 0.0, psg = 0.0, s = 0.0;
  void add(const GradTotals& other) {
    p += other.p;
    pg += other.pg;
    ps += other.ps;
    psg += other.psg;
    s += other.s;
  }
};

// Per-row state read back from the forward's stats.
// The gradient sums take s as u - pivot (S and s_k - s_mean do not change), pivot near the
// p-weighted mean of u so that sum p s g - g_mean sum p s does not cancel away a large offset:
// lse - log M (that mean for a uniform p) while lse > log(M) / 2 (p spread out) and that is not
// rounding noise (kPivotNoise), else 0 (p on a few elements near u = 0; exactly 0 keeps S exactly 0 for a one-hot p, as in the reference).
// Below kPivotNoise * log M, lse - log M is fp32 rounding of lse (p uniform to rounding, u all
// near 0, e.g. x ~ 1e19 in official mode): such a pivot would be noise far larger than the spread
// of u, and 0 is as near the mean.
constexpr double kPivotNoise = 0x1p-20;

struct BackwardRow {
  float hi, inv_scale, lse, pivot;  // lse: logsumexp of u
};

template <typename scalar_t>
GradTotals row_grad_sums(const scalar_t* x, const float* logq, int64_t begin, int64_t end, const BackwardRow& row,
                         float log_eps, bool has_eps) {
  GradTotals totals;
  for_each_block(x, begin, end, [&](int64_t start, int64_t n, const float* xf) {
    const GradSums b =
        has_eps ? block_grad_sums<true>(xf, logq + start, n, row.hi, row.inv_scale, row.lse, row.pivot, log_eps)
                : block_grad_sums<false>(xf, logq + start, n, row.hi, row.inv_scale, row.lse, row.pivot, log_eps);
    totals.add({b.p, b.pg, b.ps, b.psg, b.s});
  });
  return totals;
}

// Coefficients of grad_i = coef_p * p_i * (g_i - g_mean) - coef_s * (s_i - s_mean).
struct GradCoefs {
  float coef_p, g_mean, coef_s, s_mean;
};

// With p normalized by its computed sum, d_i = dL/ds_i = G p_i (g_i - g_mean) / sum p, and with
// S = sum_i d_i s_i (sum_i d_i = 0), back through s = (x - mean) / scale (unbiased, M - 1):
//   official (scale = var): dx_k = d_k / var - 2 S s_k / (M - 1)
//   std (scale = std):      dx_k = (d_k - S s_k / (M - 1)) / std
// Every s here is u = s - max s (S and s_k - s_mean do not change), and s_k is taken relative
// to the row mean of u.
GradCoefs grad_coefs(const GradTotals& t, double grad_loss, const BackwardRow& row, int64_t num_cols,
                     bool use_std) {
  if (row.inv_scale == 0.0f || num_cols < 2) return {0.0f, 0.0f, 0.0f, 0.0f};  // degenerate: zero grad
  const double g_mean = t.pg / t.p;
  const double s_dot_d = grad_loss * (t.psg - g_mean * t.ps) / t.p;
  const double inv_scale = row.inv_scale;
  const double per_dof = s_dot_d / static_cast<double>(num_cols - 1);
  GradCoefs coefs;
  coefs.coef_p = static_cast<float>(grad_loss / t.p * inv_scale);
  coefs.g_mean = static_cast<float>(g_mean);
  coefs.coef_s = static_cast<float>(use_std ? per_dof * inv_scale : 2.0 * per_dof);
  coefs.s_mean = static_cast<float>(t.s / static_cast<double>(num_cols));
  return coefs;
}

template <typename scalar_t>
void row_grad(const scalar_t* x, const float* logq, int64_t begin, int64_t end, const BackwardRow& row, float log_eps,
              bool has_eps, const GradCoefs& c, scalar_t* grad) {
  float buffer[kBlock];
  for_each_block(x, begin, end, [&](int64_t start, int64_t n, const float* xf) {
    float* out = buffer;
    if constexpr (std::is_same_v<scalar_t, float>) out = grad + start;
    auto* block = has_eps ? &block_grad<true> : &block_grad<false>;
    block(xf, logq + start, n, row.hi, row.inv_scale, row.lse, row.pivot, log_eps, c.coef_p, c.g_mean, c.coef_s, c.s_mean,
          out);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      for (int64_t i = 0; i < n; ++i) grad[start + i] = static_cast<scalar_t>(buffer[i]);
    }
  });
}

// ---- scheduling: whole rows per task, or rows cut into chunks when rows are fewer than threads ----

struct Split {
  int64_t chunks;     // chunks per row
  int64_t chunk_len;  // elements per chunk (a multiple of kBlock)
  int64_t num_cols;

  // fn(piece, b, begin, end) for every piece = b * chunks + c: row b's columns [begin, end), in parallel.
  template <typename Fn>
  void for_each_piece(int64_t num_rows, const Fn& fn) const {
    at::parallel_for(0, num_rows * chunks, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t piece = p0; piece < p1; ++piece) {
        const int64_t begin = (piece % chunks) * chunk_len;
        fn(piece, piece / chunks, begin, std::min(num_cols, begin + chunk_len));
      }
    });
  }
};

Split split_rows(int64_t num_rows, int64_t num_cols) {
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (num_rows < threads) {
    const int64_t wanted = (threads + num_rows - 1) / num_rows;
    const int64_t possible = std::max<int64_t>(1, num_cols / kMinChunk);
    chunks = std::min(wanted, possible);
  }
  int64_t chunk_len = (num_cols + chunks - 1) / chunks;
  chunk_len = (chunk_len + kBlock - 1) / kBlock * kBlock;
  chunks = (num_cols + chunk_len - 1) / chunk_len;
  return {chunks, chunk_len, num_cols};
}

inline float log_of_eps(double eps) { return eps > 0.0 ? static_cast<float>(std::log(eps)) : 0.0f; }

template <typename scalar_t>
void forward_rows(const scalar_t* x, int64_t stride_x, const float* logq, int64_t stride_q, int64_t num_rows,
                  int64_t num_cols, bool use_std, double eps, float* loss, float* stats) {
  const bool has_eps = eps > 0.0;
  const float log_eps = log_of_eps(eps);
  auto finish_row = [&](int64_t b, const RowParams& params, double sum_exp) {
    const float lse = static_cast<float>(std::log(sum_exp));
    stats[b * 3 + 0] = params.hi;
    stats[b * 3 + 1] = params.scale;
    stats[b * 3 + 2] = lse;
    return lse;
  };
  const Split split = split_rows(num_rows, num_cols);
  if (split.chunks == 1) {
    // Whole rows: each task runs all passes over its row while it is still in cache.
    split.for_each_piece(num_rows, [&](int64_t /*piece*/, int64_t b, int64_t begin, int64_t end) {
      const scalar_t* xb = x + b * stride_x;
      const RowParams params = row_params(row_moments(xb, begin, end), num_cols, use_std);
      const float lse = finish_row(b, params, row_sum_exp(xb, begin, end, params));
      loss[b] = static_cast<float>(row_loss(xb, logq + b * stride_q, begin, end, params, lse, log_eps, has_eps));
    });
    return;
  }
  const int64_t pieces = num_rows * split.chunks;
  std::vector<Moments> moments(pieces);
  split.for_each_piece(num_rows, [&](int64_t piece, int64_t b, int64_t begin, int64_t end) {
    moments[piece] = row_moments(x + b * stride_x, begin, end);
  });
  std::vector<RowParams> params(num_rows);
  for (int64_t b = 0; b < num_rows; ++b) {
    Moments total;
    for (int64_t c = 0; c < split.chunks; ++c) total.merge(moments[b * split.chunks + c]);
    params[b] = row_params(total, num_cols, use_std);
  }
  std::vector<double> partial(pieces);
  split.for_each_piece(num_rows, [&](int64_t piece, int64_t b, int64_t begin, int64_t end) {
    partial[piece] = row_sum_exp(x + b * stride_x, begin, end, params[b]);
  });
  std::vector<float> lse(num_rows);
  for (int64_t b = 0; b < num_rows; ++b) {
    double sum_exp = 0.0;
    for (int64_t c = 0; c < split.chunks; ++c) sum_exp += partial[b * split.chunks + c];
    lse[b] = finish_row(b, params[b], sum_exp);
  }
  split.for_each_piece(num_rows, [&](int64_t piece, int64_t b, int64_t begin, int64_t end) {
    partial[piece] =
        row_loss(x + b * stride_x, logq + b * stride_q, begin, end, params[b], lse[b], log_eps, has_eps);
  });
  for (int64_t b = 0; b < num_rows; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < split.chunks; ++c) total += partial[b * split.chunks + c];
    loss[b] = static_cast<float>(total);
  }
}

template <typename scalar_t>
void backward_rows(const float* grad_loss, const scalar_t* x, int64_t stride_x, const float* logq, int64_t stride_q,
                   const float* stats, int64_t num_rows, int64_t num_cols, bool use_std, double eps, scalar_t* grad) {
  const bool has_eps = eps > 0.0;
  const float log_eps = log_of_eps(eps);
  const double log_cols = std::log(static_cast<double>(num_cols));
  auto backward_row = [&](int64_t b) {
    const float lse = stats[b * 3 + 2];
    const double offset = lse - log_cols;
    const bool spread = lse > 0.5f * log_cols && std::fabs(offset) > kPivotNoise * log_cols;
    return BackwardRow{stats[b * 3 + 0], inverse_scale(stats[b * 3 + 1]), lse, spread ? static_cast<float>(offset) : 0.0f};
  };
  const Split split = split_rows(num_rows, num_cols);
  if (split.chunks == 1) {
    // Whole rows: each task runs both passes over its row while it is still in cache.
    split.for_each_piece(num_rows, [&](int64_t /*piece*/, int64_t b, int64_t begin, int64_t end) {
      const scalar_t* xb = x + b * stride_x;
      const float* qb = logq + b * stride_q;
      const BackwardRow row = backward_row(b);
      const GradTotals totals = row_grad_sums(xb, qb, begin, end, row, log_eps, has_eps);
      row_grad(xb, qb, begin, end, row, log_eps, has_eps, grad_coefs(totals, grad_loss[b], row, num_cols, use_std),
               grad + b * num_cols);
    });
    return;
  }
  const int64_t pieces = num_rows * split.chunks;
  std::vector<GradTotals> partial(pieces);
  split.for_each_piece(num_rows, [&](int64_t piece, int64_t b, int64_t begin, int64_t end) {
    partial[piece] = row_grad_sums(x + b * stride_x, logq + b * stride_q, begin, end, backward_row(b), log_eps,
                                   has_eps);
  });
  std::vector<GradCoefs> coefs(num_rows);
  for (int64_t b = 0; b < num_rows; ++b) {
    GradTotals totals;
    for (int64_t c = 0; c < split.chunks; ++c) totals.add(partial[b * split.chunks + c]);
    coefs[b] = grad_coefs(totals, grad_loss[b], backward_row(b), num_cols, use_std);
  }
  split.for_each_piece(num_rows, [&](int64_t /*piece*/, int64_t b, int64_t begin, int64_t end) {
    row_grad(x + b * stride_x, logq + b * stride_q, begin, end, backward_row(b), log_eps, has_eps, coefs[b],
             grad + b * num_cols);
  });
}

// ---- launchers ----

// Columns must be unit-stride for the block loops; any row stride is fine.
at::Tensor unit_column_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> kepler_kl_cpu(const at::Tensor& x_in, const at::Tensor& prior_logq_in,
                                                 bool use_std, double eps) {
  check_kepler_kl_inputs(x_in, prior_logq_in, eps, c10::DeviceType::CPU);
  const at::Tensor x = unit_column_stride(x_in);
  const at::Tensor logq = unit_column_stride(prior_logq_in);
  const int64_t num_rows = x.size(0), num_cols = x.size(1);
  at::Tensor loss = at::empty({num_rows}, x.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({num_rows, 3}, x.options().dtype(at::kFloat));
  if (num_rows == 0) return {loss, stats};
  const int64_t stride_q = logq.size(0) == 1 ? 0 : logq.stride(0);
  KEPLER_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "kepler_kl_cpu", [&] {
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), x.stride(0), logq.const_data_ptr<float>(), stride_q,
                           num_rows, num_cols, use_std, eps, loss.mutable_data_ptr<float>(),
                           stats.mutable_data_ptr<float>());
  });
  return {loss, stats};
}

at::Tensor kepler_kl_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& x_in,
                                  const at::Tensor& prior_logq_in, const at::Tensor& stats_in, bool use_std,
                                  double eps) {
  check_kepler_kl_backward_inputs(grad_loss_in, x_in, prior_logq_in, stats_in, eps, c10::DeviceType::CPU);
  const int64_t num_rows = x_in.size(0), num_cols = x_in.size(1);
  const at::Tensor x = unit_column_stride(x_in);
  const at::Tensor logq = unit_column_stride(prior_logq_in);
  const at::Tensor grad_loss = grad_loss_in.to(at::kFloat).contiguous();
  const at::Tensor stats = stats_in.contiguous();
  at::Tensor grad = at::empty({num_rows, num_cols}, x.options());
  if (num_rows == 0) return grad;
  const int64_t stride_q = logq.size(0) == 1 ? 0 : logq.stride(0);
  KEPLER_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "kepler_kl_backward_cpu", [&] {
    backward_rows<scalar_t>(grad_loss.const_data_ptr<float>(), x.const_data_ptr<scalar_t>(), x.stride(0),
                            logq.const_data_ptr<float>(), stride_q, stats.const_data_ptr<float>(), num_rows,
                            num_cols, use_std, eps, grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CPU, m) {
  m.impl("kepler_kl", &kepler::kepler_kl_cpu);
  m.impl("kepler_kl_backward", &kepler::kepler_kl_backward_cpu);
}
