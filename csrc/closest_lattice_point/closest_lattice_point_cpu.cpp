// CPU kernel of kepler::closest_lattice_point(x (N, n), lattice) -> (N, n) float32.
//
// The exact closest-point algorithms of Conway & Sloane, with the numerics that
// kepler/reference/closest_lattice_point.py fixes for every backend (float32 math, rounding to
// nearest even, D_n's parity as the count of odd coordinates, the first coordinate of largest
// |x - round(x)| moved, the second E8/A2 candidate taken only when strictly closer, NaN rows for
// non-finite input rows).
//
// The op moves n floats in and n out per row for a few dozen operations, so it only keeps up with
// memory when vectorized: the kernel works on blocks of kBlockRows = 8 rows in a structure-of-arrays scratch (column c of the
// block's 8 rows contiguous): a column is one AVX2 vector and every per-row decision (the running
// arg-max, the parity, the closer candidate) is a vector compare and blend over 8 rows at a time.
// Each at::parallel_for worker loads a block (upcasting bfloat16/float16, reading any strides),
// computes it, and stores it transposed back into the contiguous output. Rows n = 1, 2, 3, 4 and
// 8 get a specialization with the column loops unrolled; other n run the same code with a run-time
// n. Packed float32 rows of n = 1, 2, 4, 8 are transposed with AVX2 shuffles (GCC leaves the
// general load and store scalar, and their scalar stores stall the vector loads that follow).
//
// Measured on a shared 2-core Zen 3 VM, 2**20 packed float32 rows, one thread, output memory
// already mapped (noisy medians): D4 ~2.3 ms, E8 ~9 ms, Z8 ~3.8 ms, A2 ~1.1 ms against ~1.6, 3.6,
// 3.5 and 0.55 ms for torch.empty_like(x).copy_(x). E8 is compute-bound (two D8 passes and two
// distances, ~60 vector operations a row); with a fresh 32 MiB output the page faults (~30 ms)
// dominate both.
//
// x86-64 machines with AVX2 run the intrinsics block kernels (compiled for that target only and
// picked at run time); others run a portable row-at-a-time kernel with the same arithmetic.
// KEPLER_DISABLE_AVX2=1 forces the portable one (for tests).
//
// A non-finite coordinate makes its residual x - round(x) NaN (inf - inf) while a finite one
// keeps it within 1/2, so a row's sum of residuals is NaN exactly when the row must become NaN.
#include "closest_lattice_point/closest_lattice_point_checks.h"
#include "common/dispatch.h"
#include "common/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if KEPLER_X86
#include <immintrin.h>
#endif

// The reference rounds every product and sum to float32 on its own (A2's round(x / s) * s + h,
// the squared distances); a fused multiply-add would round once and pick other points, so the
// compiler must not contract them. Helpers called from this region are builtins or always-inline
// functions defined in it (GCC does not inline across optimization-option mismatches).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace kepler {
namespace {

constexpr int64_t kBlockRows = 8;  // rows per block: one AVX2 vector holds a column of the block

// float32(sqrt(3)), A2's row spacing in the reference's float32 arithmetic, and half of it (exact).
constexpr float kRoot3 = 1.7320508075688772f;
constexpr float kHalfRoot3 = kRoot3 / 2;

template <typename scalar_t>
struct RowsView {
  const scalar_t* data;
  int64_t rows, stride_n, stride_d;
};

// Rows [row0, row0 + kBlockRows) of x (those past the end as zeros) into block[c * kBlockRows + r],
// upcast to float32. Returns how many rows are real.
template <int kDim, typename scalar_t>
KEPLER_FORCE_INLINE int64_t load_block(const RowsView<scalar_t>& x, int64_t row0, int64_t dim, float* block) {
  const int64_t n = kDim > 0 ? kDim : dim;
  const int64_t count = std::min(kBlockRows, x.rows - row0);
  const scalar_t* first = x.data + row0 * x.stride_n;
  for (int64_t r = 0; r < kBlockRows; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      block[c * kBlockRows + r] = r < count ? static_cast<float>(first[r * x.stride_n + c * x.stride_d]) : 0.0f;
    }
  }
  return count;
}

// The block's first `count` rows into rows [row0, row0 + count) of the contiguous (N, n) output.
template <int kDim>
KEPLER_FORCE_INLINE void store_block(const float* block, int64_t count, int64_t row0, int64_t dim, float* out) {
  const int64_t n = kDim > 0 ? kDim : dim;
  float* first = out + row0 * n;
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t c = 0; c < n; ++c) first[r * n + c] = block[c * kBlockRows + r];
  }
}

// ---- portable kernel: one row at a time, coordinates kBlockRows apart in the block ----

KEPLER_FORCE_INLINE float round_even(float v) { return __builtin_nearbyintf(v); }  // default mode: ties to even

// point = D_n(x - shift) + shift (shift 0, or 1/2 for E8's second coset). Returns the row's sum
// of residuals (NaN for a non-finite row).
template <int kDim>
KEPLER_FORCE_INLINE float checkerboard_row(const float* x, float shift, float* point, int64_t dim) {
  const int64_t n = kDim > 0 ? kDim : dim;
  float worst = -1.0f, worst_residual = 0.0f, residual_sum = 0.0f;
  int64_t worst_index = 0;
  bool odd = false;
  for (int64_t c = 0; c < n; ++c) {
    const float v = x[c * kBlockRows] - shift;
    const float rounded = round_even(v);
    const float residual = v - rounded;
    if (__builtin_fabsf(residual) > worst) {  // strict: the first of the largest
      worst = __builtin_fabsf(residual);
      worst_residual = residual;
      worst_index = c;
    }
    const float half = rounded * 0.5f;  // exact; not an integer exactly when `rounded` is odd
    odd ^= half != round_even(half);
    residual_sum += residual;
    point[c * kBlockRows] = rounded;
  }
  if (odd) point[worst_index * kBlockRows] += worst_residual >= 0.0f ? 1.0f : -1.0f;
  if (shift != 0.0f) {
    for (int64_t c = 0; c < n; ++c) point[c * kBlockRows] += shift;
  }
  return residual_sum;
}

template <int kDim>
KEPLER_FORCE_INLINE float sq_dist_row(const float* x, const float* point, int64_t dim) {
  const int64_t n = kDim > 0 ? kDim : dim;
  float sq_dist = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    const float diff = x[c * kBlockRows] - point[c * kBlockRows];
    sq_dist += diff * diff;
  }
  return sq_dist;
}

template <LatticeFamily kFamily, int kDim>
KEPLER_FORCE_INLINE void closest_row_portable(const float* x, float* point, int64_t dim) {
  const int64_t n = kDim > 0 ? kDim : dim;
  float residual_sum = 0.0f;
  if constexpr (kFamily == LatticeFamily::kZ) {
    for (int64_t c = 0; c < n; ++c) {
      point[c * kBlockRows] = round_even(x[c * kBlockRows]);
      residual_sum += x[c * kBlockRows] - point[c * kBlockRows];
    }
  } else if constexpr (kFamily == LatticeFamily::kD) {
    residual_sum = checkerboard_row<kDim>(x, 0.0f, point, dim);
  } else if constexpr (kFamily == LatticeFamily::kE8) {
    residual_sum = checkerboard_row<8>(x, 0.0f, point, 8);
    float half_integral[8 * kBlockRows];  // same layout as `point`, only column stride used
    checkerboard_row<8>(x, 0.5f, half_integral, 8);
    if (sq_dist_row<8>(x, half_integral, 8) < sq_dist_row<8>(x, point, 8)) {
      for (int64_t c = 0; c < 8; ++c) point[c * kBlockRows] = half_integral[c * kBlockRows];
    }
  } else {  // A2: the rectangular lattice Z x sqrt(3) Z and its shift by (1/2, sqrt(3)/2)
    const float x0 = x[0], x1 = x[kBlockRows];
    const float rect0 = round_even(x0), rect1 = round_even(x1 / kRoot3) * kRoot3;
    const float shifted0 = round_even(x0 - 0.5f) + 0.5f;
    const float shifted1 = round_even((x1 - kHalfRoot3) / kRoot3) * kRoot3 + kHalfRoot3;
    const float rect_sq = (x0 - rect0) * (x0 - rect0) + (x1 - rect1) * (x1 - rect1);
    const float shifted_sq = (x0 - shifted0) * (x0 - shifted0) + (x1 - shifted1) * (x1 - shifted1);
    const bool second = shifted_sq < rect_sq;
    point[0] = second ? shifted0 : rect0;
    point[kBlockRows] = second ? shifted1 : rect1;
    residual_sum = rect_sq;  // NaN exactly for a non-finite row too
  }
  if (__builtin_isnan(residual_sum)) {
    for (int64_t c = 0; c < n; ++c) point[c * kBlockRows] = std::numeric_limits<float>::quiet_NaN();
  }
}

// ---- AVX2 kernel: the same arithmetic on the block's 8 rows at once ----

#if KEPLER_X86
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE __m256 round_even_avx2(__m256 v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// points = D_n(x - shift) + shift on the block; returns the rows' residual sums.
template <int kDim, bool kShifted>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE __m256 checkerboard_avx2(const float* x, __m256 shift, float* points,
                                                                int64_t dim) {
  const int64_t n = kDim > 0 ? kDim : dim;
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 worst = _mm256_set1_ps(-1.0f), worst_residual = _mm256_setzero_ps(), residual_sum = _mm256_setzero_ps();
  __m256i worst_index = _mm256_setzero_si256(), parity = _mm256_setzero_si256();
  for (int64_t c = 0; c < n; ++c) {
    __m256 v = _mm256_loadu_ps(x + c * kBlockRows);
    if (kShifted) v = _mm256_sub_ps(v, shift);
    const __m256 rounded = round_even_avx2(v);
    const __m256 residual = _mm256_sub_ps(v, rounded);
    const __m256 magnitude = _mm256_andnot_ps(sign_bit, residual);
    const __m256 further = _mm256_cmp_ps(magnitude, worst, _CMP_GT_OQ);  // strict: the first of the largest
    worst = _mm256_blendv_ps(worst, magnitude, further);
    worst_residual = _mm256_blendv_ps(worst_residual, residual, further);
    worst_index = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(worst_index), _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(c))), further));
    // The low bits of the rounded integers sum to the parity. Beyond int32 the conversion gives
    // 0x80000000 (even), as it should: every float32 from 2**24 on is even.
    parity = _mm256_xor_si256(parity, _mm256_cvtps_epi32(rounded));
    residual_sum = _mm256_add_ps(residual_sum, residual);
    _mm256_storeu_ps(points + c * kBlockRows, rounded);
  }
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(parity, one), one);
  // +1 when the worst residual is >= 0, else -1 (a residual is never -0: x - x is +0).
  const __m256 step = _mm256_or_ps(_mm256_and_ps(worst_residual, sign_bit), _mm256_set1_ps(1.0f));
  for (int64_t c = 0; c < n; ++c) {
    const __m256i moved = _mm256_and_si256(odd, _mm256_cmpeq_epi32(worst_index, _mm256_set1_epi32(static_cast<int32_t>(c))));
    __m256 point = _mm256_add_ps(_mm256_loadu_ps(points + c * kBlockRows), _mm256_and_ps(_mm256_castsi256_ps(moved), step));
    if (kShifted) point = _mm256_add_ps(point, shift);
    _mm256_storeu_ps(points + c * kBlockRows, point);
  }
  return residual_sum;
}

// Transposes between 8 packed float32 rows of n = 1, 2, 4 or 8 coordinates (`rows`, row-major)
// and the block layout (`columns`, column-major): shuffles within and across the 128-bit lanes.
constexpr bool has_transpose_avx2(int dim) { return dim == 1 || dim == 2 || dim == 4 || dim == 8; }

// The 8 x 8 transpose, its own inverse.
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE void transpose8x8_avx2(const float* in, float* out) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    const __m256 a = _mm256_loadu_ps(in + 16 * i), b = _mm256_loadu_ps(in + 16 * i + 8);
    t[2 * i] = _mm256_unpacklo_ps(a, b);
    t[2 * i + 1] = _mm256_unpackhi_ps(a, b);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + 8 * i, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
    _mm256_storeu_ps(out + 8 * (i + 4), _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
  }
}

template <int kDim>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE void rows_to_columns_avx2(const float* rows, float* columns) {
  static_assert(has_transpose_avx2(kDim));
  if constexpr (kDim == 1) {
    _mm256_storeu_ps(columns, _mm256_loadu_ps(rows));
  } else if constexpr (kDim == 2) {  // (x0 y0 x1 y1 | x2 y2 x3 y3), (rows 4 to 7)
    const __m256 a = _mm256_loadu_ps(rows), b = _mm256_loadu_ps(rows + 8);
    // (x0 x1 x4 x5 | x2 x3 x6 x7), then the middle 64-bit pairs swapped.
    const __m256 xs = _mm256_shuffle_ps(a, b, 0x88), ys = _mm256_shuffle_ps(a, b, 0xDD);
    _mm256_storeu_ps(columns, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xs), 0xD8)));
    _mm256_storeu_ps(columns + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ys), 0xD8)));
  } else if constexpr (kDim == 4) {  // (r0 | r1), (r2 | r3), ...: pair rows i and i + 4 in a vector, then 4 x 4 transposes per lane
    const __m256 a = _mm256_loadu_ps(rows), b = _mm256_loadu_ps(rows + 8);
    const __m256 c = _mm256_loadu_ps(rows + 16), d = _mm256_loadu_ps(rows + 24);
    const __m256 p0 = _mm256_permute2f128_ps(a, c, 0x20), p1 = _mm256_permute2f128_ps(a, c, 0x31);
    const __m256 p2 = _mm256_permute2f128_ps(b, d, 0x20), p3 = _mm256_permute2f128_ps(b, d, 0x31);
    const __m256 t0 = _mm256_unpacklo_ps(p0, p1), t1 = _mm256_unpackhi_ps(p0, p1);
    const __m256 t2 = _mm256_unpacklo_ps(p2, p3), t3 = _mm256_unpackhi_ps(p2, p3);
    _mm256_storeu_ps(columns, _mm256_shuffle_ps(t0, t2, 0x44));
    _mm256_storeu_ps(columns + 8, _mm256_shuffle_ps(t0, t2, 0xEE));
    _mm256_storeu_ps(columns + 16, _mm256_shuffle_ps(t1, t3, 0x44));
    _mm256_storeu_ps(columns + 24, _mm256_shuffle_ps(t1, t3, 0xEE));
  } else {
    transpose8x8_avx2(rows, columns);
  }
}

template <int kDim>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE void columns_to_rows_avx2(const float* columns, float* rows) {
  static_assert(has_transpose_avx2(kDim));
  if constexpr (kDim == 1) {
    _mm256_storeu_ps(rows, _mm256_loadu_ps(columns));
  } else if constexpr (kDim == 2) {
    const __m256 xs = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_loadu_ps(columns)), 0xD8));
    const __m256 ys = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_loadu_ps(columns + 8)), 0xD8));
    _mm256_storeu_ps(rows, _mm256_unpacklo_ps(xs, ys));
    _mm256_storeu_ps(rows + 8, _mm256_unpackhi_ps(xs, ys));
  } else if constexpr (kDim == 4) {
    const __m256 c0 = _mm256_loadu_ps(columns), c1 = _mm256_loadu_ps(columns + 8);
    const __m256 c2 = _mm256_loadu_ps(columns + 16), c3 = _mm256_loadu_ps(columns + 24);
    const __m256 t0 = _mm256_unpacklo_ps(c0, c1), t1 = _mm256_unpackhi_ps(c0, c1);
    const __m256 t2 = _mm256_unpacklo_ps(c2, c3), t3 = _mm256_unpackhi_ps(c2, c3);
    const __m256 p0 = _mm256_shuffle_ps(t0, t2, 0x44), p1 = _mm256_shuffle_ps(t0, t2, 0xEE);  // (r0 | r4), (r1 | r5)
    const __m256 p2 = _mm256_shuffle_ps(t1, t3, 0x44), p3 = _mm256_shuffle_ps(t1, t3, 0xEE);  // (r2 | r6), (r3 | r7)
    _mm256_storeu_ps(rows, _mm256_permute2f128_ps(p0, p1, 0x20));
    _mm256_storeu_ps(rows + 8, _mm256_permute2f128_ps(p2, p3, 0x20));
    _mm256_storeu_ps(rows + 16, _mm256_permute2f128_ps(p0, p1, 0x31));
    _mm256_storeu_ps(rows + 24, _mm256_permute2f128_ps(p2, p3, 0x31));
  } else {
    transpose8x8_avx2(columns, rows);
  }
}

// load_block and store_block, by the transposes above where the rows are packed float32 (the
// output always is) and the block is full.
template <int kDim, typename scalar_t>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE int64_t load_block_avx2(const RowsView<scalar_t>& x, int64_t row0, int64_t dim,
                                                               float* block) {
  if constexpr (std::is_same_v<scalar_t, float> && has_transpose_avx2(kDim)) {
    if (row0 + kBlockRows <= x.rows && x.stride_n == kDim && (kDim == 1 || x.stride_d == 1)) {
      rows_to_columns_avx2<kDim>(x.data + row0 * kDim, block);
      return kBlockRows;
    }
  }
  return load_block<kDim>(x, row0, dim, block);
}

template <int kDim>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE void store_block_avx2(const float* block, int64_t count, int64_t row0,
                                                             int64_t dim, float* out) {
  if constexpr (has_transpose_avx2(kDim)) {
    if (count == kBlockRows) {
      columns_to_rows_avx2<kDim>(block, out + row0 * kDim);
      return;
    }
  }
  store_block<kDim>(block, count, row0, dim, out);
}

template <int kDim>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE __m256 sq_dist_avx2(const float* x, const float* points, int64_t dim) {
  const int64_t n = kDim > 0 ? kDim : dim;
  __m256 sq_dist = _mm256_setzero_ps();
  for (int64_t c = 0; c < n; ++c) {
    const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(x + c * kBlockRows), _mm256_loadu_ps(points + c * kBlockRows));
    sq_dist = _mm256_add_ps(sq_dist, _mm256_mul_ps(diff, diff));
  }
  return sq_dist;
}

// round((x - offset) / spacing) * spacing + offset, rounded step by step as the reference does.
template <bool kOffset>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE __m256 round_to_grid_avx2(__m256 x, __m256 spacing, __m256 offset) {
  const __m256 scaled = _mm256_div_ps(kOffset ? _mm256_sub_ps(x, offset) : x, spacing);
  const __m256 grid = _mm256_mul_ps(round_even_avx2(scaled), spacing);
  return kOffset ? _mm256_add_ps(grid, offset) : grid;
}

template <LatticeFamily kFamily, int kDim>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE void closest_block_avx2(const float* x, float* points, int64_t dim) {
  const int64_t n = kDim > 0 ? kDim : dim;
  __m256 residual_sum = _mm256_setzero_ps();
  if constexpr (kFamily == LatticeFamily::kZ) {
    for (int64_t c = 0; c < n; ++c) {
      const __m256 v = _mm256_loadu_ps(x + c * kBlockRows);
      const __m256 rounded = round_even_avx2(v);
      residual_sum = _mm256_add_ps(residual_sum, _mm256_sub_ps(v, rounded));
      _mm256_storeu_ps(points + c * kBlockRows, rounded);
    }
  } else if constexpr (kFamily == LatticeFamily::kD) {
    residual_sum = checkerboard_avx2<kDim, false>(x, _mm256_setzero_ps(), points, dim);
  } else if constexpr (kFamily == LatticeFamily::kE8) {
    alignas(32) float half_integral[8 * kBlockRows];
    residual_sum = checkerboard_avx2<8, false>(x, _mm256_setzero_ps(), points, 8);
    checkerboard_avx2<8, true>(x, _mm256_set1_ps(0.5f), half_integral, 8);
    const __m256 second = _mm256_cmp_ps(sq_dist_avx2<8>(x, half_integral, 8), sq_dist_avx2<8>(x, points, 8), _CMP_LT_OQ);
    for (int64_t c = 0; c < 8; ++c) {
      const __m256 point = _mm256_blendv_ps(_mm256_loadu_ps(points + c * kBlockRows),
                                            _mm256_loadu_ps(half_integral + c * kBlockRows), second);
      _mm256_storeu_ps(points + c * kBlockRows, point);
    }
  } else {  // A2: the rectangular lattice Z x sqrt(3) Z and its shift by (1/2, sqrt(3)/2)
    const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + kBlockRows);
    const __m256 one = _mm256_set1_ps(1.0f), root3 = _mm256_set1_ps(kRoot3);
    const __m256 rect0 = round_even_avx2(x0);  // round(x0 / 1) * 1
    const __m256 rect1 = round_to_grid_avx2<false>(x1, root3, root3);
    const __m256 shifted0 = round_to_grid_avx2<true>(x0, one, _mm256_set1_ps(0.5f));
    const __m256 shifted1 = round_to_grid_avx2<true>(x1, root3, _mm256_set1_ps(kHalfRoot3));
    const __m256 rect_diff0 = _mm256_sub_ps(x0, rect0), rect_diff1 = _mm256_sub_ps(x1, rect1);
    const __m256 shifted_diff0 = _mm256_sub_ps(x0, shifted0), shifted_diff1 = _mm256_sub_ps(x1, shifted1);
    const __m256 rect_sq = _mm256_add_ps(_mm256_mul_ps(rect_diff0, rect_diff0), _mm256_mul_ps(rect_diff1, rect_diff1));
    const __m256 shifted_sq =
        _mm256_add_ps(_mm256_mul_ps(shifted_diff0, shifted_diff0), _mm256_mul_ps(shifted_diff1, shifted_diff1));
    const __m256 second = _mm256_cmp_ps(shifted_sq, rect_sq, _CMP_LT_OQ);
    _mm256_storeu_ps(points, _mm256_blendv_ps(rect0, shifted0, second));
    _mm256_storeu_ps(points + kBlockRows, _mm256_blendv_ps(rect1, shifted1, second));
    residual_sum = rect_sq;  // NaN exactly for a non-finite row too
  }
  // All-ones (a NaN) over the rows to poison.
  const __m256 poison = _mm256_cmp_ps(residual_sum, residual_sum, _CMP_UNORD_Q);
  for (int64_t c = 0; c < n; ++c) {
    _mm256_storeu_ps(points + c * kBlockRows, _mm256_or_ps(_mm256_loadu_ps(points + c * kBlockRows), poison));
  }
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif  // KEPLER_X86

bool avx2_disabled_by_env() {
  const char* value = std::getenv("KEPLER_DISABLE_AVX2");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// ---- the row loops: blocks [block_begin, block_end) of x into out ----

// `scratch` holds 2 * dim * kBlockRows floats: the block's input and its points.
template <typename scalar_t>
using ClosestRowsFn = void (*)(const RowsView<scalar_t>& x, int64_t dim, int64_t block_begin, int64_t block_end,
                               float* scratch, float* out);

template <LatticeFamily kFamily, int kDim, typename scalar_t>
void closest_rows_portable(const RowsView<scalar_t>& x, int64_t dim, int64_t block_begin, int64_t block_end,
                           float* scratch, float* out) {
  float* points = scratch + dim * kBlockRows;
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t count = load_block<kDim>(x, block * kBlockRows, dim, scratch);
    for (int64_t r = 0; r < count; ++r) closest_row_portable<kFamily, kDim>(scratch + r, points + r, dim);
    store_block<kDim>(points, count, block * kBlockRows, dim, out);
  }
}

#if KEPLER_X86
template <LatticeFamily kFamily, int kDim, typename scalar_t>
KEPLER_TARGET_AVX2 void closest_rows_avx2(const RowsView<scalar_t>& x, int64_t dim, int64_t block_begin,
                                          int64_t block_end, float* scratch, float* out) {
  float* points = scratch + dim * kBlockRows;
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t count = load_block_avx2<kDim>(x, block * kBlockRows, dim, scratch);
    closest_block_avx2<kFamily, kDim>(scratch, points, dim);
    store_block_avx2<kDim>(points, count, block * kBlockRows, dim, out);
  }
}
#endif

template <LatticeFamily kFamily, int kDim, typename scalar_t>
ClosestRowsFn<scalar_t> pick_path() {
#if KEPLER_X86
  if (cpu_has_avx2() && !avx2_disabled_by_env()) return &closest_rows_avx2<kFamily, kDim, scalar_t>;
#endif
  return &closest_rows_portable<kFamily, kDim, scalar_t>;
}

// The row loop of a Z or D family for this n: unrolled for n = 1, 2, 3, 4, 8, a run-time n otherwise.
template <LatticeFamily kFamily, typename scalar_t>
ClosestRowsFn<scalar_t> pick_unrolled(int64_t dim) {
  switch (dim) {
    case 1: return pick_path<kFamily, 1, scalar_t>();
    case 2: return pick_path<kFamily, 2, scalar_t>();
    case 3: return pick_path<kFamily, 3, scalar_t>();
    case 4: return pick_path<kFamily, 4, scalar_t>();
    case 8: return pick_path<kFamily, 8, scalar_t>();
    default: return pick_path<kFamily, 0, scalar_t>();
  }
}

template <typename scalar_t>
ClosestRowsFn<scalar_t> pick_rows_kernel(LatticeFamily family, int64_t dim) {
  switch (family) {
    case LatticeFamily::kA2: return pick_path<LatticeFamily::kA2, 2, scalar_t>();
    case LatticeFamily::kE8: return pick_path<LatticeFamily::kE8, 8, scalar_t>();
    case LatticeFamily::kZ: return pick_unrolled<LatticeFamily::kZ, scalar_t>(dim);
    case LatticeFamily::kD: break;
  }
  return pick_unrolled<LatticeFamily::kD, scalar_t>(dim);
}

at::Tensor closest_lattice_point_cpu(const at::Tensor& x, c10::string_view lattice) {
  const LatticeFamily family =
      check_closest_lattice_point_inputs(x, std::string(lattice.data(), lattice.size()), c10::DeviceType::CPU);
  const int64_t rows = x.size(0), dim = x.size(1);
  auto out = at::empty({rows, dim}, x.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  // About 32k coordinates per task, as at::internal::GRAIN_SIZE: less is not worth a thread.
  const int64_t grain_blocks = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (kBlockRows * dim));
  float* out_data = out.data_ptr<float>();
  KEPLER_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "closest_lattice_point_cpu", [&] {
    const RowsView<scalar_t> rows_view{x.const_data_ptr<scalar_t>(), rows, x.stride(0), x.stride(1)};
    const ClosestRowsFn<scalar_t> closest_rows = pick_rows_kernel<scalar_t>(family, dim);
    at::parallel_for(0, blocks, grain_blocks, [&](int64_t block_begin, int64_t block_end) {
      std::vector<float> scratch(2 * dim * kBlockRows);
      closest_rows(rows_view, dim, block_begin, block_end, scratch.data(), out_data);
    });
  });
  return out;
}

}  // namespace
}  // namespace kepler

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

TORCH_LIBRARY_IMPL(kepler, CPU, m) { m.impl("closest_lattice_point", &kepler::closest_lattice_point_cpu); }
