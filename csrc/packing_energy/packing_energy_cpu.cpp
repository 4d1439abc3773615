// CPU kernels of kepler::packing_energy and kepler::packing_energy_backward.
//
// Raw Gaussian-potential energy of points y (G, K, d):
//   row_lse[g, i] = log sum_{j != i} exp(-t ||y_i - y_j||^2)
//   energy[g]     = logsumexp_i row_lse[g, i] - log(K (K - 1))
// and its gradient
//   dE/dy_i = -4t sum_{j != i} p_ij (y_i - y_j),  p_ij = exp(-t d_ij - log S),  S = sum_{i != j} w_ij
//           = coef_i * (y_i * sum_j q_ij - sum_j q_ij y_j),
//   q_ij = exp(-t d_ij - row_lse_i) (<= 1, so no overflow/underflow of a whole row),
//   coef_i = grad_energy * (-4t) * exp(row_lse_i - log S).
// (Each unordered pair appears twice in S, which gives the 2 of -4t = 2 * (-t) * 2.)
//
// Work is split over (group, tile of kRowTile rows) with at::parallel_for; each task streams the
// codewords in tiles of kColTile columns and keeps an online log-sum-exp per row, so memory is the
// codebook (one transposed fp32 copy, padded to whole tiles) plus O(K). Distances are the exact
// sum of squared differences (no ||a||^2 + ||b||^2 - 2ab cancellation). The loops use GCC/Clang
// vector types (8 floats / 4 doubles), compiled twice on x86-64 (AVX2+FMA and baseline SSE2) and
// picked at load time (KEPLER_TARGET_CLONES), because the extension is built for the baseline ISA;
// the hot loops are templates forced inline into each clone, so each clone gets its own vector code.
#include "packing_energy/packing_energy_checks.h"
#include "common/dispatch.h"
#include "common/simd.h"
#include "common/vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ceil_div.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// Vector-returning helpers are always inlined, so no vector values cross a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kepler {
namespace {

constexpr int64_t kRowTile = 64;   // rows (codewords i) per parallel task
constexpr int64_t kColTile = 256;  // columns (codewords j) streamed per step
constexpr int64_t kRowBlock = 4;   // rows sharing each column load in the distance loop

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32)));
  typedef int32_t ivec __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename Simd<T>::vec;
template <typename T>
constexpr int64_t kLanes = sizeof(vec_t<T>) / sizeof(T);
static_assert(kColTile % kLanes<float> == 0 && kColTile % kLanes<double> == 0);

template <typename T>
KEPLER_FORCE_INLINE vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
KEPLER_FORCE_INLINE void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
KEPLER_FORCE_INLINE vec_t<T> splat(T x) {
  return vec_t<T>{} + x;
}
template <typename T>
KEPLER_FORCE_INLINE T sum_lanes(vec_t<T> v) {
  T total = 0;
  for (int64_t l = 0; l < kLanes<T>; ++l) total += v[l];
  return total;
}
// max(a, b), NaN when either is NaN (per lane for vectors), as torch.logsumexp propagates NaN.
// A plain `a > b ? a : b` drops a NaN a: a row whose scores are all NaN would then look fully
// masked (max -inf) and get row_lse = -inf instead of NaN.
template <typename T>
KEPLER_FORCE_INLINE T nan_max(T a, T b) {
  return (a > b) | (a != a) ? a : b;
}
template <typename T>
KEPLER_FORCE_INLINE T max_lanes(vec_t<T> v) {
  T best = v[0];
  for (int64_t l = 1; l < kLanes<T>; ++l) best = nan_max(v[l], best);
  return best;
}

// exp(x) for x <= 0 (larger x is clamped to 0), 8 lanes, branch-free: std::exp does not vectorize
// without -ffast-math. Cephes expf: 2^n * p(r), |r| <= ln2/2, ~2 ulp. Exactly 0 below log(FLT_MIN)
// (masked -inf entries must contribute nothing); NaN stays NaN.
KEPLER_FORCE_INLINE vec_t<float> exp_nonpositive(vec_t<float> x) {
  using vec = vec_t<float>;
  using ivec = Simd<float>::ivec;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kMinArg = -87.3365447f;
  const ivec underflow = x < kMinArg;
  vec xc = x > 0.0f ? splat(0.0f) : x;
  xc = xc < kMinArg ? splat(kMinArg) : xc;
  // Round to nearest: truncation toward zero of xc*log2e - 0.5 (xc <= 0).
  const ivec n = __builtin_convertvector(xc * kLog2e - 0.5f, ivec);
  const vec p = cephes_exp_reduced(xc, __builtin_convertvector(n, vec));
  const vec scale = (vec)((n + 127) << 23);
  return underflow ? splat(0.0f) : p * scale;
}

// float64 is for gradcheck-grade testing, not speed.
KEPLER_FORCE_INLINE vec_t<double> exp_nonpositive(vec_t<double> x) {
  vec_t<double> out;
  for (int64_t l = 0; l < kLanes<double>; ++l) out[l] = std::exp(std::min(x[l], 0.0));
  return out;
}

// Packed operands of one group: y_t[k * ld + j] = y[j, k] for j < K (zero padding up to ld), the
// transposed layout the column loops read contiguously.
template <typename acc_t>
struct PackedPoints {
  const acc_t* y_t;
  int64_t ld;  // padded K, a multiple of kColTile
  int64_t K;
  int64_t dim;
};

// rows[r * dim + k] = y[i0 + r, k] for the task's rows (zero rows past K).
template <typename acc_t>
KEPLER_FORCE_INLINE void gather_rows(const PackedPoints<acc_t>& pts, int64_t i0, int64_t num_rows, acc_t* rows) {
  for (int64_t r = 0; r < kRowTile; ++r) {
    for (int64_t k = 0; k < pts.dim; ++k) {
      rows[r * pts.dim + k] = r < num_rows ? pts.y_t[k * pts.ld + i0 + r] : acc_t(0);
    }
  }
}

// scores[r * kColTile + c] = -t ||rows_r - y_{j0 + c}||^2, with -inf where j0 + c is r's own
// codeword or past K.
template <typename acc_t>
KEPLER_FORCE_INLINE void score_tile(const PackedPoints<acc_t>& pts, const acc_t* rows, int64_t i0, int64_t num_rows,
                              int64_t j0, acc_t neg_t, acc_t* scores) {
  using vec = vec_t<acc_t>;
  const int64_t dim = pts.dim;
  const acc_t* cols = pts.y_t + j0;
  for (int64_t r0 = 0; r0 < num_rows; r0 += kRowBlock) {
    const acc_t* a = rows + r0 * dim;
    acc_t* s = scores + r0 * kColTile;
    for (int64_t c = 0; c < kColTile; c += kLanes<acc_t>) {
      vec d0{}, d1{}, d2{}, d3{};
      for (int64_t k = 0; k < dim; ++k) {
        const vec v = load(cols + k * pts.ld + c);
        const vec e0 = a[k] - v, e1 = a[dim + k] - v, e2 = a[2 * dim + k] - v, e3 = a[3 * dim + k] - v;
        d0 += e0 * e0;
        d1 += e1 * e1;
        d2 += e2 * e2;
        d3 += e3 * e3;
      }
      store(s + c, neg_t * d0);
      store(s + kColTile + c, neg_t * d1);
      store(s + 2 * kColTile + c, neg_t * d2);
      store(s + 3 * kColTile + c, neg_t * d3);
    }
  }
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t valid_cols = std::min(kColTile, pts.K - j0);
  for (int64_t r = 0; r < num_rows; ++r) {
    acc_t* s = scores + r * kColTile;
    std::fill(s + valid_cols, s + kColTile, kNegInf);
    const int64_t self = i0 + r - j0;
    if (self >= 0 && self < kColTile) s[self] = kNegInf;
  }
}

// Forward of one task: row_lse for rows [i0, i0 + num_rows) of one group.
template <typename acc_t>
KEPLER_FORCE_INLINE void forward_rows(const PackedPoints<acc_t>& pts, int64_t i0, int64_t num_rows, acc_t t,
                                acc_t* rows, acc_t* scores, acc_t* row_lse) {
  using vec = vec_t<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t running_max[kRowTile];
  acc_t running_sum[kRowTile];
  std::fill(running_max, running_max + kRowTile, kNegInf);
  std::fill(running_sum, running_sum + kRowTile, acc_t(0));
  gather_rows(pts, i0, num_rows, rows);
  for (int64_t j0 = 0; j0 < pts.K; j0 += kColTile) {
    score_tile(pts, rows, i0, num_rows, j0, -t, scores);
    for (int64_t r = 0; r < num_rows; ++r) {
      const acc_t* s = scores + r * kColTile;
      vec tile_max_v = splat(kNegInf);
      for (int64_t c = 0; c < kColTile; c += kLanes<acc_t>) {
        const vec v = load(s + c);
        tile_max_v = nan_max(v, tile_max_v);
      }
      const acc_t tile_max = max_lanes<acc_t>(tile_max_v);
      if (tile_max == kNegInf) continue;  // only masked entries in this tile
      const acc_t new_max = nan_max(running_max[r], tile_max);
      vec tile_sum{};
      for (int64_t c = 0; c < kColTile; c += kLanes<acc_t>) tile_sum += exp_nonpositive(load(s + c) - new_max);
      const acc_t rescale = exp_nonpositive(splat(running_max[r] - new_max))[0];
      running_sum[r] = running_sum[r] * rescale + sum_lanes<acc_t>(tile_sum);
      running_max[r] = new_max;
    }
  }
  for (int64_t r = 0; r < num_rows; ++r) row_lse[r] = running_max[r] + std::log(running_sum[r]);
}

// Backward of one task: grad rows [i0, i0 + num_rows) of one group.
template <typename acc_t>
KEPLER_FORCE_INLINE void backward_rows(const PackedPoints<acc_t>& pts, int64_t i0, int64_t num_rows, acc_t t,
                                 const acc_t* row_lse, const acc_t* coef, acc_t* rows, acc_t* scores,
                                 acc_t* weighted_sum, acc_t* grad) {
  using vec = vec_t<acc_t>;
  const int64_t dim = pts.dim;
  acc_t weight_sum[kRowTile];
  std::fill(weight_sum, weight_sum + kRowTile, acc_t(0));
  std::fill(weighted_sum, weighted_sum + kRowTile * dim, acc_t(0));
  gather_rows(pts, i0, num_rows, rows);
  for (int64_t j0 = 0; j0 < pts.K; j0 += kColTile) {
    score_tile(pts, rows, i0, num_rows, j0, -t, scores);
    for (int64_t r = 0; r < num_rows; ++r) {
      acc_t* q = scores + r * kColTile;
      const acc_t lse = row_lse[r];
      vec tile_sum{};
      for (int64_t c = 0; c < kColTile; c += kLanes<acc_t>) {
        const vec w = exp_nonpositive(load(q + c) - lse);
        store(q + c, w);
        tile_sum += w;
      }
      weight_sum[r] += sum_lanes<acc_t>(tile_sum);
    }
    // weighted_sum[r] += sum_c q[r, c] y_{j0 + c}, four rows per load of y (rows past num_rows
    // read stale weights into accumulators that are never used).
    for (int64_t r0 = 0; r0 < num_rows; r0 += kRowBlock) {
      const acc_t* q = scores + r0 * kColTile;
      acc_t* acc = weighted_sum + r0 * dim;
      for (int64_t k = 0; k < dim; ++k) {
        const acc_t* col = pts.y_t + k * pts.ld + j0;
        vec dot0{}, dot1{}, dot2{}, dot3{};
        for (int64_t c = 0; c < kColTile; c += kLanes<acc_t>) {
          const vec v = load(col + c);
          dot0 += load(q + c) * v;
          dot1 += load(q + kColTile + c) * v;
          dot2 += load(q + 2 * kColTile + c) * v;
          dot3 += load(q + 3 * kColTile + c) * v;
        }
        acc[k] += sum_lanes<acc_t>(dot0);
        acc[dim + k] += sum_lanes<acc_t>(dot1);
        acc[2 * dim + k] += sum_lanes<acc_t>(dot2);
        acc[3 * dim + k] += sum_lanes<acc_t>(dot3);
      }
    }
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t k = 0; k < dim; ++k) {
      grad[r * dim + k] = coef[r] * (rows[r * dim + k] * weight_sum[r] - weighted_sum[r * dim + k]);
    }
  }
}

KEPLER_TARGET_CLONES void forward_rows_f32(const PackedPoints<float>& pts, int64_t i0, int64_t num_rows,
                                           float t, float* rows, float* scores, float* row_lse) {
  forward_rows<float>(pts, i0, num_rows, t, rows, scores, row_lse);
}

KEPLER_TARGET_CLONES void backward_rows_f32(const PackedPoints<float>& pts, int64_t i0, int64_t num_rows,
                                            float t, const float* row_lse, const float* coef, float* rows,
                                            float* scores, float* weighted_sum, float* grad) {
  backward_rows<float>(pts, i0, num_rows, t, row_lse, coef, rows, scores, weighted_sum, grad);
}

void forward_rows_dispatch(const PackedPoints<float>& pts, int64_t i0, int64_t n, float t, float* rows,
                           float* scores, float* row_lse) {
  forward_rows_f32(pts, i0, n, t, rows, scores, row_lse);
}
void forward_rows_dispatch(const PackedPoints<double>& pts, int64_t i0, int64_t n, double t, double* rows,
                           double* scores, double* row_lse) {
  forward_rows<double>(pts, i0, n, t, rows, scores, row_lse);
}
void backward_rows_dispatch(const PackedPoints<float>& pts, int64_t i0, int64_t n, float t, const float* lse,
                            const float* coef, float* rows, float* scores, float* wsum, float* grad) {
  backward_rows_f32(pts, i0, n, t, lse, coef, rows, scores, wsum, grad);
}
void backward_rows_dispatch(const PackedPoints<double>& pts, int64_t i0, int64_t n, double t,
                            const double* lse, const double* coef, double* rows, double* scores,
                            double* wsum, double* grad) {
  backward_rows<double>(pts, i0, n, t, lse, coef, rows, scores, wsum, grad);
}

// (G, d, ld) accumulate-dtype copy of y transposed, zero-padded to whole column tiles.
at::Tensor pack_transposed(const at::Tensor& y) {
  const int64_t K = y.size(1);
  const int64_t ld = (K + kColTile - 1) / kColTile * kColTile;
  at::Tensor packed = at::zeros({y.size(0), y.size(2), ld}, y.options().dtype(accumulate_type(y.scalar_type())));
  packed.narrow(2, 0, K).copy_(y.transpose(1, 2));
  return packed;
}

template <typename acc_t>
PackedPoints<acc_t> group_points(const at::Tensor& packed, int64_t g, int64_t K) {
  return {packed.data_ptr<acc_t>() + g * packed.stride(0), packed.size(2), K, packed.size(1)};
}

// Scratch of one worker: its task's rows, one tile of scores, and the backward's weighted sums.
template <typename acc_t>
struct TaskBuffers {
  explicit TaskBuffers(int64_t dim)
      : rows(kRowTile * dim), scores(kRowTile * kColTile), weighted_sum(kRowTile * dim) {}
  std::vector<acc_t> rows, scores, weighted_sum;
};

// Calls fn(g, i0, num_rows, buffers) for every tile of kRowTile rows (codewords i0 ..) of every
// group, spread over the at::parallel_for workers.
template <typename acc_t, typename Fn>
void for_each_row_tile(int64_t G, int64_t K, int64_t dim, const Fn& fn) {
  const int64_t tiles_per_group = at::ceil_div(K, kRowTile);
  at::parallel_for(0, G * tiles_per_group, 1, [&](int64_t begin, int64_t end) {
    TaskBuffers<acc_t> buffers(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = (task % tiles_per_group) * kRowTile;
      fn(task / tiles_per_group, i0, std::min(kRowTile, K - i0), buffers);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> packing_energy_cpu(const at::Tensor& y, double t) {
  check_packing_energy_inputs(y, t, c10::DeviceType::CPU);
  const int64_t G = y.size(0), K = y.size(1), dim = y.size(2);
  const at::Tensor packed = pack_transposed(y);
  at::Tensor row_lse = at::empty({G, K}, packed.options());
  KEPLER_DISPATCH_KERNEL_DTYPES_AND_DOUBLE(y.scalar_type(), "packing_energy_cpu", [&] {
    using acc_t = accumulate_t<scalar_t>;
    acc_t* row_lse_data = row_lse.data_ptr<acc_t>();
    for_each_row_tile<acc_t>(G, K, dim, [&](int64_t g, int64_t i0, int64_t num_rows, TaskBuffers<acc_t>& buffers) {
      forward_rows_dispatch(group_points<acc_t>(packed, g, K), i0, num_rows, static_cast<acc_t>(t),
                            buffers.rows.data(), buffers.scores.data(), row_lse_data + g * K + i0);
    });
  });
  at::Tensor energy = at::logsumexp(row_lse, {1}) - std::log(static_cast<double>(K) * static_cast<double>(K - 1));
  return {energy, row_lse};
}

at::Tensor packing_energy_backward_cpu(const at::Tensor& grad_energy, const at::Tensor& y, double t,
                                       const at::Tensor& energy, const at::Tensor& row_lse) {
  check_packing_energy_backward_inputs(grad_energy, y, t, energy, row_lse, c10::DeviceType::CPU);
  const int64_t G = y.size(0), K = y.size(1), dim = y.size(2);
  const auto acc_type = accumulate_type(y.scalar_type());
  const at::Tensor packed = pack_transposed(y);
  const at::Tensor lse = row_lse.to(acc_type).contiguous();
  // coef_i = grad_energy * (-4t) * exp(row_lse_i - log S), log S = energy + log(K(K-1)): O(G K).
  const double log_pairs = std::log(static_cast<double>(K) * static_cast<double>(K - 1));
  const at::Tensor log_total = energy.to(acc_type).unsqueeze(1) + log_pairs;
  const at::Tensor coef = ((lse - log_total).exp() * grad_energy.to(acc_type).unsqueeze(1) * (-4.0 * t)).contiguous();
  at::Tensor grad = at::empty({G, K, dim}, packed.options());
  KEPLER_DISPATCH_KERNEL_DTYPES_AND_DOUBLE(y.scalar_type(), "packing_energy_backward_cpu", [&] {
    using acc_t = accumulate_t<scalar_t>;
    const acc_t* lse_data = lse.data_ptr<acc_t>();
    const acc_t* coef_data = coef.data_ptr<acc_t>();
    acc_t* grad_data = grad.data_ptr<acc_t>();
    for_each_row_tile<acc_t>(G, K, dim, [&](int64_t g, int64_t i0, int64_t num_rows, TaskBuffers<acc_t>& buffers) {
      const int64_t offset = g * K + i0;
      backward_rows_dispatch(group_points<acc_t>(packed, g, K), i0, num_rows, static_cast<acc_t>(t),
                             lse_data + offset, coef_data + offset, buffers.rows.data(), buffers.scores.data(),
                             buffers.weighted_sum.data(), grad_data + offset * dim);
    });
  });
  return grad.to(y.scalar_type());
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CPU, m) {
  m.impl("packing_energy", &kepler::packing_energy_cpu);
  m.impl("packing_energy_backward", &kepler::packing_energy_backward_cpu);
}
