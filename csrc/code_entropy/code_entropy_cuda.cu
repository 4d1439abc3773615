// CUDA kernels of kepler::code_entropy and kepler::code_entropy_backward.
//
// The spec is kepler/reference/code_entropy.py (its module docstring); notation as there: z' = z * s
// and e' = e * s with s = scale, c[n, k] = ||e'_k||^2 - 2 z'_n . e'_k, alpha = inv_temperature / s^2
// capped at FLT_MAX, t[n, k] = (c[n, k] - c_min[n]) * alpha, l_n = sum_k exp(-t), H_n = log l_n +
// (sum_k t exp(-t)) / l_n, p[n, k] = exp(-t[n, k]) / l_n = exp(-t - log l_n), code_mass[k] =
// sum_n p[n, k].
//
// Written to be simple and correct rather than fast (the layout of packing_energy_cuda.cu): one
// thread per row n (row kernels) or per code k (code kernels), kThreads of them per block; the
// other side is streamed through shared memory in tiles of kTile vectors x kChunkD coordinates,
// upcast to float32 and multiplied by s as they are loaded (inputs read through their strides, no
// copy). No N x K tensor exists: every score is recomputed where it is needed. Launches, on the
// current stream:
//   forward   1. _code_norms_kernel       ||e'_k||^2, (Gc, K) float32
//             2. _rows_kernel             per row: pass 1 c_min, pass 2 l and sum t exp(-t) -> row_stats, l
//             3. _code_mass_kernel        per code: sum over the rows, in order, of p -> code_mass
//   backward  1. _code_norms_kernel
//             2. _row_dot_kernel          per row: l again and r_n = sum_k p[n, k] w_k, (G, N) float32
//             3. _grad_z_kernel           grid z = chunks of kChunkD output coordinates
//             4. _grad_codebook_kernel    grid z = chunks of kChunkD output coordinates
// Extra memory is O(N + K): the norms (Gc, K), l (G, N) in both passes, and r (G, N) in the backward.
//
// How each rule of the spec is met:
// * Scores: every score, in every kernel, is computed by the same instructions: the dot product
//   z'.e' as a compensated sum of fmaf products in ascending d from 0 (tile_dots; fmaf is symmetric
//   in its two factors, so the row kernels, which hold z', and the code kernels, which hold e', get
//   the same bits), then c = fmaf(-2, dot, ||e'||^2) with the norm from _code_norms_kernel. So
//   c_min of the forward is exactly a score of the row, the winner's t is exactly 0, and the
//   backward sees the forward's scores and (by the same sum) the forward's l.
// * Every long sum (over d, over the codes of a row, over the rows of a code, over the groups of a
//   shared codebook) is compensated (CompensatedSum): within a few ulps, below the error of the
//   reference's own pairwise sums, whatever N, K, D.
// * float32 accumulation for every input dtype; bfloat16/float16 are upcast as they are staged.
// * scale is read from device memory in every kernel (`*scale`, no host sync); alpha is computed
//   in double from inv_temperature and s (exact: s is a power of two) and capped at FLT_MAX
//   (effective_alpha), so it is never inf (no 0 * inf at the winner). t = (c - c_min) * alpha is
//   rounded on its own (__fmul_rn: never contracted into a later add), as in the reference.
// * t exp(-t) adds exactly 0 where exp(-t) is 0 (t may be inf there): `if (w != 0)` in _rows_kernel.
//   A saturated row has l = 1 and H = 0 exactly; m tied codes give l = m, H = log m.
// * c_min is min_k c with NaN propagated as torch.amin does (nan_min). A row with any non-finite
//   score gets log l = H = NaN (`finite` in _rows_kernel); the code kernel takes p = NaN for a row
//   whose log l is NaN, so code_mass is NaN for the whole group, as in the reference.
// * code_mass is a sum over the rows in increasing n by the thread owning code k, of
//   p = exp(-t) / l (the reference's weights / l_sum, with the forward's l): deterministic, no
//   atomics. N = 0: the row kernels are not launched and code_mass is 0.
// * Backward: with w_k = log code_mass[k] - log N (0 for a mass of exactly 0, NaN for a NaN mass) and
//   r_n = sum_k p w_k (a term with p == 0 adds 0; a NaN p or w is kept), the logit gradient
//   G = -(p / N) (g_s (log p + H) + g_b (w_k - r_n)), 0 where p == 0 (NaN there too when w_k or
//   r_n is NaN), with p = exp(-t) / l (l recomputed as in the forward) and log p = -t - log l.
//   It is multiplied by alpha per element (scaled_logit_grad), as the reference's autograd does
//   (alpha = FLT_MAX times G = 0 stays 0), then grad_z[n] = 2 s sum_k (alpha G) e'_k and
//   grad_e[k] = 2 s (sum_n (alpha G) z'_n - e'_k sum_n alpha G). A saturated row has G = 0 exactly
//   (p = 1, H = 0, r_n = w_k), so a zero gradient.
// * Non-finite inputs in the backward follow the reference's autograd (the oracle): (a) a group
//   holding a non-finite row has every code_mass NaN, and `entropies` keeps a NaN mass (only masses
//   == 0 are dropped), so batch is NaN and its gradient d batch / d mass_k = -(log mass_k + 1) / N
//   is NaN for every k, whatever g_b (NaN * 0 is NaN): code_weight gives w_k = NaN, so r_n is NaN and
//   G is NaN for every k of every finite row of that group, p == 0 included (the reference's
//   exp backward multiplies the NaN by p = 0); (b) a non-finite row's own G is untouched by that NaN
//   (the reference's torch.where masks the row to a zero upstream gradient): NaN for every k where
//   its l is NaN (some t NaN), else 0 (_row_dot_kernel passes this through r_n); (c) a zero G times
//   an inf coordinate gives NaN in the gradient sums, as in the reference's matmuls. So grad_z is NaN
//   on every finite row of such a group and grad_codebook on every code of its codebook.
// * Shared codebook (Gc = 1): _grad_codebook_kernel's thread for code k loops over every group g in
//   order and sums its rows' terms into one accumulator: the group sum, deterministic. The forward
//   keeps code_mass per group g (grid y = G, code group 0).
// * Bounds: every staged load is guarded by `vector < count && d < dim` (zeros outside, and the d
//   loop of a dot product stops at D); scores of codes k >= K / rows n >= N are never used
//   (guarded in every loop); row_stats, l, r, code_mass and the outputs are read and written only
//   for n < N, k < K, d < D. K or N not a multiple of the tile and D not a multiple of kChunkD are
//   covered by the same guards. Empty grids (G = 0, N = 0, D = 0) are never launched.
// * expf/logf are the full-precision functions (no __expf/__logf, no --use_fast_math in setup.py).
#include "code_entropy/code_entropy_checks.h"
#include "common/dispatch.h"

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace kepler {
namespace {

constexpr int kThreads = 128;  // rows (row kernels) or codes (code kernels) per block, one per thread
constexpr int kTile = 32;      // vectors of the other side per shared-memory tile
constexpr int kChunkD = 32;    // coordinates per shared-memory tile, and output coordinates per block
constexpr int kMaxGridYZ = 65535;
constexpr int kFlatThreads = 256;  // _code_norms_kernel

// Vectors of one group of z (rows n) or of one codebook (codes k), read through their strides.
template <typename scalar_t>
struct Vectors {
  const scalar_t* base;  // already offset to the group
  int64_t count, stride_v, stride_d;
};

// Everything every kernel reads about the inputs; passed by value.
template <typename scalar_t>
struct Inputs {
  const scalar_t* z;
  int64_t z_stride_g, z_stride_n, z_stride_d;
  const scalar_t* codebook;
  int64_t e_stride_g, e_stride_k, e_stride_d;
  const float* code_norms;  // (Gc, K), ||e'_k||^2
  const float* scale;       // 0-d, on the device
  double inv_temperature;
  int64_t groups, rows, codes, dim;
  bool shared_codebook;

  __device__ int64_t code_group(int64_t g) const { return shared_codebook ? 0 : g; }
  __device__ Vectors<scalar_t> rows_of(int64_t g) const { return {z + g * z_stride_g, rows, z_stride_n, z_stride_d}; }
  __device__ Vectors<scalar_t> codes_of(int64_t code_group) const {
    return {codebook + code_group * e_stride_g, codes, e_stride_k, e_stride_d};
  }
};

// alpha = inv_temperature / s^2 capped at the largest float32. In double, so s^2 neither
// underflows nor rounds (s is a power of two) and the quotient is rounded once; never inf.
__device__ __forceinline__ float effective_alpha(double inv_temperature, float s) {
  const double s2 = static_cast<double>(s) * static_cast<double>(s);
  const double alpha = inv_temperature / s2;
  return alpha < static_cast<double>(FLT_MAX) ? static_cast<float>(alpha) : FLT_MAX;
}

// min(a, b), NaN when either is NaN (torch.amin).
__device__ __forceinline__ float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

// The score c = ||e'||^2 - 2 dot, rounded once (2 * dot is exact).
__device__ __forceinline__ float score_of(float dot, float code_norm) { return fmaf(-2.f, dot, code_norm); }

// t = (c - c_min) * alpha, rounded on its own so that no caller's expression contracts it.
__device__ __forceinline__ float shifted_of(float score, float c_min, float alpha) {
  return __fmul_rn(score - c_min, alpha);
}

// A compensated (Kahan) running sum. Every sum over the streamed rows, codes or coordinates uses it:
// a plain running float sum of n terms errs by up to ~n ulps, several times the error of the
// reference's pairwise torch.sum / blocked matmul (the tests allow twice that); this one stays
// within a few ulps of the total whatever n. add_product(a, b) adds a * b through one explicit fmaf
// (exact product), so the compiler has nothing to contract differently in different kernels; an
// inf total resets the compensation, so inf stays inf rather than turning NaN.
struct CompensatedSum {
  float sum = 0.f, compensation = 0.f;
  __device__ __forceinline__ void add_corrected(float y) {  // y = the next term less the compensation
    const float total = sum + y;
    compensation = isfinite(total) ? (total - sum) - y : 0.f;
    sum = total;
  }
  __device__ __forceinline__ void add(float x) { add_corrected(x - compensation); }
  __device__ __forceinline__ void add_product(float a, float b) { add_corrected(fmaf(a, b, -compensation)); }
};

// Stages coordinates [d0, d0 + kChunkD) of vectors [first, first + kVectors) of `v`, times s, into
// tile (zeros outside the vectors and the coordinates).
template <int kVectors, typename scalar_t>
__device__ __forceinline__ void stage(const Vectors<scalar_t>& v, int64_t first, int64_t d0, int64_t dim, float s,
                                      float (*tile)[kChunkD + 1]) {
  for (int e = threadIdx.x; e < kVectors * kChunkD; e += blockDim.x) {
    const int r = e / kChunkD, k = e % kChunkD;
    const int64_t vector = first + r, d = d0 + k;
    tile[r][k] = (vector < v.count && d < dim) ? static_cast<float>(v.base[vector * v.stride_v + d * v.stride_d]) * s
                                               : 0.f;
  }
}

// dots[c] = own'_i . other'_{other0 + c} over all D, for this thread's vector i = own0 + threadIdx.x,
// a compensated sum in ascending d (the one definition of the dot product of a score; fmaf is
// symmetric in its factors, so a row kernel and a code kernel get the same bits).
template <typename scalar_t>
__device__ __forceinline__ void tile_dots(const Vectors<scalar_t>& own, int64_t own0, const Vectors<scalar_t>& other,
                                          int64_t other0, int64_t dim, float s, float (*own_tile)[kChunkD + 1],
                                          float (*other_tile)[kChunkD + 1], float* dots) {
  CompensatedSum acc[kTile];
  for (int64_t d0 = 0; d0 < dim; d0 += kChunkD) {
    __syncthreads();  // previous users of the shared tiles are done
    stage<kThreads>(own, own0, d0, dim, s, own_tile);
    stage<kTile>(other, other0, d0, dim, s, other_tile);
    __syncthreads();
    const int chunk = static_cast<int>(dim - d0 < kChunkD ? dim - d0 : kChunkD);
    for (int k = 0; k < chunk; ++k) {
      const float a = own_tile[threadIdx.x][k];
#pragma unroll
      for (int c = 0; c < kTile; ++c) acc[c].add_product(a, other_tile[c][k]);
    }
  }
#pragma unroll
  for (int c = 0; c < kTile; ++c) dots[c] = acc[c].sum;
}

// ||e'_k||^2 of every code of every codebook, a compensated sum in ascending d.
template <typename scalar_t>
__global__ void _code_norms_kernel(Inputs<scalar_t> in, int64_t total, float* __restrict__ norms) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const float s = *in.scale;
  const scalar_t* e = in.codebook + (i / in.codes) * in.e_stride_g + (i % in.codes) * in.e_stride_k;
  CompensatedSum norm;
  for (int64_t d = 0; d < in.dim; ++d) {
    const float value = static_cast<float>(e[d * in.e_stride_d]) * s;
    norm.add_product(value, value);
  }
  norms[i] = norm.sum;
}

// Forward, one thread per row n of group g = blockIdx.y: row_stats[g, n] = (c_min, log l, H), and
// row_l[g, n] = l for _code_mass_kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _rows_kernel(Inputs<scalar_t> in, float* __restrict__ row_stats, float* __restrict__ row_l) {
  __shared__ float own_tile[kThreads][kChunkD + 1];
  __shared__ float other_tile[kTile][kChunkD + 1];
  const int64_t g = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t n = n0 + threadIdx.x;
  const float s = *in.scale;
  const float alpha = effective_alpha(in.inv_temperature, s);
  const Vectors<scalar_t> rows = in.rows_of(g);
  const Vectors<scalar_t> codes = in.codes_of(in.code_group(g));
  const float* norms = in.code_norms + in.code_group(g) * in.codes;
  float dots[kTile];

  // Pass 1: c_min = min_k c (NaN if a score is NaN) and whether every score of the row is finite.
  float c_min = INFINITY;
  bool finite = true;
  for (int64_t k0 = 0; k0 < in.codes; k0 += kTile) {
    tile_dots(rows, n0, codes, k0, in.dim, s, own_tile, other_tile, dots);
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      const int64_t k = k0 + c;
      if (k < in.codes) {
        const float score = score_of(dots[c], norms[k]);
        c_min = nan_min(score, c_min);
        finite = finite && isfinite(score);
      }
    }
  }

  // Pass 2: l = sum_k exp(-t) and sum_k t exp(-t), the latter skipping the terms whose exp(-t) is 0.
  CompensatedSum l_acc, weighted_t_acc;
  for (int64_t k0 = 0; k0 < in.codes; k0 += kTile) {
    tile_dots(rows, n0, codes, k0, in.dim, s, own_tile, other_tile, dots);
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      const int64_t k = k0 + c;
      if (k < in.codes) {
        const float t = shifted_of(score_of(dots[c], norms[k]), c_min, alpha);
        const float weight = expf(-t);
        l_acc.add(weight);
        if (weight != 0.f) weighted_t_acc.add(t * weight);
      }
    }
  }

  if (n >= in.rows) return;  // after the last __syncthreads
  float* out = row_stats + (g * in.rows + n) * 3;
  const float l_sum = l_acc.sum, weighted_t = weighted_t_acc.sum;
  const float log_l = logf(l_sum);
  out[0] = c_min;
  out[1] = finite ? log_l : NAN;
  out[2] = finite ? log_l + weighted_t / l_sum : NAN;
  row_l[g * in.rows + n] = l_sum;
}

// Forward, one thread per code k, for group g = blockIdx.y: code_mass[g, k] = sum_n p[n, k], the rows
// in increasing n, with p = exp(-t) / l as the reference's weights / l_sum (not exp(-t - log l): the
// rounding of log l would move every p of a row by up to ~ulp(log l), relatively, and code_mass
// sums these errors), and NaN for a non-finite row (log l NaN), as its where(finite_row, ...).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _code_mass_kernel(Inputs<scalar_t> in, const float* __restrict__ row_stats,
                                                              const float* __restrict__ row_l,
                                                              float* __restrict__ code_mass) {
  __shared__ float own_tile[kThreads][kChunkD + 1];
  __shared__ float other_tile[kTile][kChunkD + 1];
  const int64_t g = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t k = k0 + threadIdx.x;
  const float s = *in.scale;
  const float alpha = effective_alpha(in.inv_temperature, s);
  const Vectors<scalar_t> codes = in.codes_of(in.code_group(g));
  const Vectors<scalar_t> rows = in.rows_of(g);
  const float code_norm = k < in.codes ? in.code_norms[in.code_group(g) * in.codes + k] : 0.f;
  const float* stats = row_stats + g * in.rows * 3;
  const float* l_of_row = row_l + g * in.rows;
  float dots[kTile];
  CompensatedSum mass;
  for (int64_t n0 = 0; n0 < in.rows; n0 += kTile) {
    tile_dots(codes, k0, rows, n0, in.dim, s, own_tile, other_tile, dots);
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      const int64_t n = n0 + c;
      if (n < in.rows) {
        const float c_min = stats[n * 3 + 0], log_l = stats[n * 3 + 1];
        const float t = shifted_of(score_of(dots[c], code_norm), c_min, alpha);
        mass.add(isnan(log_l) ? NAN : expf(-t) / l_of_row[n]);
      }
    }
  }
  if (k < in.codes) code_mass[g * in.codes + k] = mass.sum;
}

// The backward's per-group values.
struct Upstream {
  const float* grad_per_sample;  // (G,)
  const float* grad_batch;       // (G,)
  const float* row_stats;        // (G, N, 3)
  const float* code_mass;        // (G, K)
  const float* row_dot;          // (G, N), r_n (written by _row_dot_kernel, read after it; see there)
  const float* row_l;            // (G, N), l_n (written by _row_dot_kernel, read after it)
  float rows;                    // N
  float log_rows;                // log N (0 for N = 0, then unused)
};

// w_k = log code_mass[k] - log N, and 0 where code_mass[k] == 0, as the reference's `entropies`
// drops exactly the masses == 0 (mass log mass is 0 there, with a zero gradient; such a code has
// p == 0 in every row, whose terms are 0 anyway). A NaN mass (every mass of a group holding a
// non-finite row) gives w_k = NaN: the reference's batch entropy and its gradient are NaN there.
__device__ __forceinline__ float code_weight(const Upstream& up, int64_t g, int64_t codes, int64_t k) {
  const float mass = up.code_mass[g * codes + k];
  return mass == 0.f ? 0.f : logf(mass) - up.log_rows;
}

// alpha * G[n, k] for the score c of row n: G = -(p / N) (g_s (log p + H) + g_b (w_k - r_n)) with
// p = exp(-t) / l (as in _code_mass_kernel) and log p = -t - log l, and 0 where p == 0 unless w_k or
// r_n is NaN (a finite row of a group with NaN masses: the reference's G is NaN at every k there,
// p == 0 included). A non-finite row (log l NaN) gets r_n, which _row_dot_kernel set to the
// reference's gradient there: NaN or 0.
__device__ __forceinline__ float scaled_logit_grad(float score, float c_min, float log_l, float l, float entropy,
                                                   float r, float w, float g_s, float g_b, float rows, float alpha) {
  if (isnan(log_l)) return r;
  const float t = shifted_of(score, c_min, alpha);
  const float p = expf(-t) / l;
  if (p == 0.f) return (isnan(w) || isnan(r)) ? NAN : 0.f;
  const float log_p = -t - log_l;
  const float grad = -(p / rows) * (g_s * (log_p + entropy) + g_b * (w - r));
  return grad * alpha;
}

// Backward, one thread per row n of group g = blockIdx.y: l_n = sum_k exp(-t) (the forward's l, by
// the same instructions) and r_n = sum_k p[n, k] w_k = (sum_k exp(-t) w_k) / l_n for a finite row:
// NaN in a group with NaN masses (every w_k NaN, and the winner's term has p > 0).
// For a non-finite row (log l NaN) r_n is instead the logit gradient the reference gives every code
// of that row: its torch.where masks the row to a zero upstream gradient (even where the upstream
// is NaN), which the backward of log l and p = exp(-t) / l turns into NaN exactly when
// l = sum_k exp(-t) is NaN, i.e. when some t is NaN (a NaN score, or a -inf / all +inf scores),
// whatever the other rows; a row whose only non-finite scores are +inf above a
// finite c_min has l finite and a zero gradient. The products 0 * inf of such a zero with an inf
// coordinate of e' or z' then give NaN in grad_z / grad_codebook where the reference's matmuls do.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _row_dot_kernel(Inputs<scalar_t> in, Upstream up, float* __restrict__ r, float* __restrict__ row_l) {
  __shared__ float own_tile[kThreads][kChunkD + 1];
  __shared__ float other_tile[kTile][kChunkD + 1];
  const int64_t g = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t n = n0 + threadIdx.x;
  const bool valid = n < in.rows;
  const float s = *in.scale;
  const float alpha = effective_alpha(in.inv_temperature, s);
  const Vectors<scalar_t> rows = in.rows_of(g);
  const Vectors<scalar_t> codes = in.codes_of(in.code_group(g));
  const float* norms = in.code_norms + in.code_group(g) * in.codes;
  const float* stats = up.row_stats + (g * in.rows + (valid ? n : 0)) * 3;  // read only when valid
  const float c_min = valid ? stats[0] : 0.f, log_l = valid ? stats[1] : 0.f;
  float dots[kTile];
  CompensatedSum l_acc, weighted_w_acc;
  bool nan_t = false;  // some t of the row is NaN
  for (int64_t k0 = 0; k0 < in.codes; k0 += kTile) {
    tile_dots(rows, n0, codes, k0, in.dim, s, own_tile, other_tile, dots);
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      const int64_t k = k0 + c;
      if (k < in.codes) {
        const float t = shifted_of(score_of(dots[c], norms[k]), c_min, alpha);
        const float weight = expf(-t);
        l_acc.add(weight);
        nan_t = nan_t || isnan(t);
        if (weight != 0.f) weighted_w_acc.add(weight * code_weight(up, g, in.codes, k));
      }
    }
  }
  if (!valid) return;
  r[g * in.rows + n] = isnan(log_l) ? (nan_t ? NAN : 0.f) : weighted_w_acc.sum / l_acc.sum;
  row_l[g * in.rows + n] = l_acc.sum;
}

// Backward, one thread per row n of group g = blockIdx.y, output coordinates [out0, out0 + kChunkD)
// with out0 = blockIdx.z * kChunkD: grad_z[g, n, d] = 2 s sum_k (alpha G[n, k]) e'_k[d].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _grad_z_kernel(Inputs<scalar_t> in, Upstream up, scalar_t* __restrict__ grad_z) {
  __shared__ float own_tile[kThreads][kChunkD + 1];
  __shared__ float other_tile[kTile][kChunkD + 1];
  const int64_t g = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t n = n0 + threadIdx.x;
  const int64_t out0 = static_cast<int64_t>(blockIdx.z) * kChunkD;
  const bool valid = n < in.rows;
  const float s = *in.scale;
  const float alpha = effective_alpha(in.inv_temperature, s);
  const Vectors<scalar_t> rows = in.rows_of(g);
  const Vectors<scalar_t> codes = in.codes_of(in.code_group(g));
  const float* norms = in.code_norms + in.code_group(g) * in.codes;
  const float* stats = up.row_stats + (g * in.rows + (valid ? n : 0)) * 3;  // read only when valid
  const float c_min = valid ? stats[0] : 0.f, log_l = valid ? stats[1] : 0.f, entropy = valid ? stats[2] : 0.f;
  const float r = valid ? up.row_dot[g * in.rows + n] : 0.f, l = valid ? up.row_l[g * in.rows + n] : 1.f;
  const float g_s = up.grad_per_sample[g], g_b = up.grad_batch[g];
  float dots[kTile];
  CompensatedSum weighted[kChunkD];  // sum_k alpha G e'_k
  for (int64_t k0 = 0; k0 < in.codes; k0 += kTile) {
    tile_dots(rows, n0, codes, k0, in.dim, s, own_tile, other_tile, dots);
    float coef[kTile];
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      const int64_t k = k0 + c;
      coef[c] = (valid && k < in.codes)
                    ? scaled_logit_grad(score_of(dots[c], norms[k]), c_min, log_l, l, entropy, r,
                                        code_weight(up, g, in.codes, k), g_s, g_b, up.rows, alpha)
                    : 0.f;
    }
    __syncthreads();  // every thread is done with the score tiles
    stage<kTile>(codes, k0, out0, in.dim, s, other_tile);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
#pragma unroll
      for (int j = 0; j < kChunkD; ++j) weighted[j].add_product(coef[c], other_tile[c][j]);
    }
  }
  if (!valid) return;  // after the last __syncthreads
  const float two_s = 2.f * s;
  scalar_t* out = grad_z + (g * in.rows + n) * in.dim;
#pragma unroll
  for (int j = 0; j < kChunkD; ++j) {
    if (out0 + j < in.dim) out[out0 + j] = static_cast<scalar_t>(two_s * weighted[j].sum);
  }
}

// Backward, one thread per code k of codebook cg = blockIdx.y, output coordinates [out0, out0 +
// kChunkD) with out0 = blockIdx.z * kChunkD: grad_codebook[cg, k, d] = 2 s (sum (alpha G) z'_n[d] -
// e'_k[d] sum (alpha G)), the sums over the rows of group cg, or of every group in order when the
// codebook is shared.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _grad_codebook_kernel(Inputs<scalar_t> in, Upstream up, scalar_t* __restrict__ grad_codebook) {
  __shared__ float own_tile[kThreads][kChunkD + 1];
  __shared__ float other_tile[kTile][kChunkD + 1];
  const int64_t cg = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t k = k0 + threadIdx.x;
  const int64_t out0 = static_cast<int64_t>(blockIdx.z) * kChunkD;
  const bool valid = k < in.codes;
  const float s = *in.scale;
  const float alpha = effective_alpha(in.inv_temperature, s);
  const Vectors<scalar_t> codes = in.codes_of(cg);
  const float code_norm = valid ? in.code_norms[cg * in.codes + k] : 0.f;
  const int64_t g_begin = in.shared_codebook ? 0 : cg;
  const int64_t g_end = in.shared_codebook ? in.groups : cg + 1;
  float dots[kTile];
  CompensatedSum grad_sum;            // sum alpha G
  CompensatedSum weighted[kChunkD];  // sum alpha G z'_n
  for (int64_t g = g_begin; g < g_end; ++g) {
    const Vectors<scalar_t> rows = in.rows_of(g);
    const float* stats = up.row_stats + g * in.rows * 3;
    const float* row_dot = up.row_dot + g * in.rows;
    const float* l_of_row = up.row_l + g * in.rows;
    const float w = valid ? code_weight(up, g, in.codes, k) : 0.f;
    const float g_s = up.grad_per_sample[g], g_b = up.grad_batch[g];
    for (int64_t n0 = 0; n0 < in.rows; n0 += kTile) {
      tile_dots(codes, k0, rows, n0, in.dim, s, own_tile, other_tile, dots);
      float coef[kTile];
#pragma unroll
      for (int c = 0; c < kTile; ++c) {
        const int64_t n = n0 + c;
        coef[c] = (valid && n < in.rows)
                      ? scaled_logit_grad(score_of(dots[c], code_norm), stats[n * 3 + 0], stats[n * 3 + 1], l_of_row[n],
                                          stats[n * 3 + 2], row_dot[n], w, g_s, g_b, up.rows, alpha)
                      : 0.f;
        grad_sum.add(coef[c]);
      }
      __syncthreads();  // every thread is done with the score tiles
      stage<kTile>(rows, n0, out0, in.dim, s, other_tile);
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kTile; ++c) {
#pragma unroll
        for (int j = 0; j < kChunkD; ++j) weighted[j].add_product(coef[c], other_tile[c][j]);
      }
    }
  }
  if (!valid) return;  // after the last __syncthreads
  const float two_s = 2.f * s;
  const scalar_t* e = in.codebook + cg * in.e_stride_g + k * in.e_stride_k;
  scalar_t* out = grad_codebook + (cg * in.codes + k) * in.dim;
#pragma unroll
  for (int j = 0; j < kChunkD; ++j) {
    const int64_t d = out0 + j;
    if (d < in.dim) {
      const float code = static_cast<float>(e[d * in.e_stride_d]) * s;
      out[d] = static_cast<scalar_t>(two_s * (weighted[j].sum - code * grad_sum.sum));
    }
  }
}

// Groups (and codebooks) go to gridDim.y, output chunks of D to gridDim.z (each at most 65535),
// tiles of rows and codes to gridDim.x (below 2**31).
void check_grid_limits(const char* op, const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.size(0) <= kMaxGridYZ, op, ": at most ", kMaxGridYZ, " groups G, got G=", z.size(0));
  TORCH_CHECK(at::ceil_div<int64_t>(z.size(2), kChunkD) <= kMaxGridYZ, op, ": D too large, got D=", z.size(2));
  TORCH_CHECK(at::ceil_div<int64_t>(z.size(1), kThreads) < (int64_t{1} << 31), op, ": too many rows N=", z.size(1));
  TORCH_CHECK(at::ceil_div<int64_t>(codebook.size(0) * codebook.size(1), kFlatThreads) < (int64_t{1} << 31), op,
              ": too many codes Gc*K=", codebook.size(0) * codebook.size(1));
}

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& scale,
                           double inv_temperature, const at::Tensor& code_norms) {
  return {z.data_ptr<scalar_t>(),
          z.stride(0),
          z.stride(1),
          z.stride(2),
          codebook.data_ptr<scalar_t>(),
          codebook.stride(0),
          codebook.stride(1),
          codebook.stride(2),
          code_norms.data_ptr<float>(),
          scale.data_ptr<float>(),
          inv_temperature,
          z.size(0),
          z.size(1),
          codebook.size(1),
          z.size(2),
          codebook.size(0) == 1};
}

template <typename scalar_t>
void launch_code_norms(const Inputs<scalar_t>& in, int64_t code_groups, float* norms, cudaStream_t stream) {
  const int64_t total = code_groups * in.codes;
  _code_norms_kernel<scalar_t>
      <<<static_cast<unsigned>(at::ceil_div<int64_t>(total, kFlatThreads)), kFlatThreads, 0, stream>>>(in, total,
                                                                                                        norms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> code_entropy_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                     const at::Tensor& scale, double inv_temperature) {
  check_code_entropy_inputs(z, codebook, scale, inv_temperature, c10::DeviceType::CUDA);
  check_grid_limits("kepler::code_entropy", z, codebook);
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t G = z.size(0), N = z.size(1), Gc = codebook.size(0), K = codebook.size(1);
  const auto float_options = z.options().dtype(at::kFloat);
  at::Tensor row_stats = at::empty({G, N, 3}, float_options);
  at::Tensor code_mass = at::empty({G, K}, float_options);
  if (G == 0) return {row_stats, code_mass};
  at::Tensor code_norms = at::empty({Gc, K}, float_options);
  at::Tensor row_l = at::empty({G, N}, float_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KEPLER_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "code_entropy_cuda", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(z, codebook, scale, inv_temperature, code_norms);
    launch_code_norms(in, Gc, code_norms.data_ptr<float>(), stream);
    if (N > 0) {
      const dim3 grid(static_cast<unsigned>(at::ceil_div<int64_t>(N, kThreads)), static_cast<unsigned>(G));
      _rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(in, row_stats.data_ptr<float>(), row_l.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Launched for N = 0 too: it writes code_mass = 0.
    const dim3 grid(static_cast<unsigned>(at::ceil_div<int64_t>(K, kThreads)), static_cast<unsigned>(G));
    _code_mass_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(in, row_stats.data_ptr<float>(),
                                                               row_l.data_ptr<float>(), code_mass.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_stats, code_mass};
}

std::tuple<at::Tensor, at::Tensor> code_entropy_backward_cuda(const at::Tensor& grad_per_sample,
                                                              const at::Tensor& grad_batch, const at::Tensor& z,
                                                              const at::Tensor& codebook, const at::Tensor& scale,
                                                              double inv_temperature, const at::Tensor& row_stats,
                                                              const at::Tensor& code_mass) {
  check_code_entropy_backward_inputs(grad_per_sample, grad_batch, z, codebook, scale, inv_temperature, row_stats,
                                     code_mass, c10::DeviceType::CUDA);
  check_grid_limits("kepler::code_entropy_backward", z, codebook);
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t G = z.size(0), N = z.size(1), D = z.size(2), Gc = codebook.size(0), K = codebook.size(1);
  at::Tensor grad_z = at::empty({G, N, D}, z.options());
  at::Tensor grad_codebook = at::empty({Gc, K, D}, codebook.options());
  if (Gc == 0 || D == 0) return {grad_z, grad_codebook};  // Gc = 0 means G = 0: both are empty
  const auto float_options = z.options().dtype(at::kFloat);
  const at::Tensor grad_s = grad_per_sample.contiguous(), grad_b = grad_batch.contiguous();
  const at::Tensor stats = row_stats.contiguous(), mass = code_mass.contiguous();
  at::Tensor code_norms = at::empty({Gc, K}, float_options);
  at::Tensor row_dot = at::empty({G, N}, float_options);
  at::Tensor row_l = at::empty({G, N}, float_options);
  const Upstream up{grad_s.data_ptr<float>(),
                    grad_b.data_ptr<float>(),
                    stats.data_ptr<float>(),
                    mass.data_ptr<float>(),
                    row_dot.data_ptr<float>(),
                    row_l.data_ptr<float>(),
                    static_cast<float>(N),
                    N > 0 ? static_cast<float>(std::log(static_cast<double>(N))) : 0.f};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KEPLER_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "code_entropy_backward_cuda", [&] {
    const Inputs<scalar_t> in = inputs_of<scalar_t>(z, codebook, scale, inv_temperature, code_norms);
    launch_code_norms(in, Gc, code_norms.data_ptr<float>(), stream);
    const auto chunks = static_cast<unsigned>(at::ceil_div<int64_t>(D, kChunkD));
    if (G > 0 && N > 0) {
      const dim3 row_grid(static_cast<unsigned>(at::ceil_div<int64_t>(N, kThreads)), static_cast<unsigned>(G));
      _row_dot_kernel<scalar_t>
          <<<row_grid, kThreads, 0, stream>>>(in, up, row_dot.data_ptr<float>(), row_l.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 grad_z_grid(row_grid.x, row_grid.y, chunks);
      _grad_z_kernel<scalar_t><<<grad_z_grid, kThreads, 0, stream>>>(in, up, grad_z.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Launched for N = 0 (and G = 0 with a shared codebook) too: an empty sum gives 0.
    const dim3 code_grid(static_cast<unsigned>(at::ceil_div<int64_t>(K, kThreads)), static_cast<unsigned>(Gc), chunks);
    _grad_codebook_kernel<scalar_t>
        <<<code_grid, kThreads, 0, stream>>>(in, up, grad_codebook.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_z, grad_codebook};
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CUDA, m) {
  m.impl("code_entropy", &kepler::code_entropy_cuda);
  m.impl("code_entropy_backward", &kepler::code_entropy_backward_cuda);
}
