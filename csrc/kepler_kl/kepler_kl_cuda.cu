// Fused Kepler KL regularizer on CUDA: one thread block per row, block-wide reductions.
//
// Same passes and math as the CPU kernel (kepler_kl_cpu.cpp; documented in
// kepler/ops/kepler_kl.py): forward (1) Welford moments + max/min, (2) logsumexp of s,
// (3) sum p log(p/q + eps); backward (1) sum p, p g, p s, p s g, s, (2) the gradient.
// Offsets are int64; any strides for x and prior_logq; the gradient is written contiguous.
#include "kepler_kl/kepler_kl_checks.h"
#include "common/dispatch.h"

#include <cfloat>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <tuple>

namespace kepler {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Double: squared deviations of values near 1e19 overflow fp32 and those near 1e-20 sink into its
// subnormals (one pass over the row, memory-bound, so the double arithmetic costs little).
struct Welford {
  double count, mean, m2;
};

struct WelfordMerge {
  // Chan et al.'s exact merge of two (count, mean, M2) summaries.
  __device__ Welford operator()(const Welford& a, const Welford& b) const {
    const double total = a.count + b.count;
    if (b.count == 0.0) return a;
    if (a.count == 0.0) return b;
    const double delta = b.mean - a.mean;
    const double weight_b = b.count / total;
    return {total, a.mean + delta * weight_b, a.m2 + b.m2 + delta * delta * a.count * weight_b};
  }
};

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Min {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};

__device__ inline float shfl_down(float value, int offset) { return __shfl_down_sync(0xffffffffu, value, offset); }
__device__ inline double shfl_down(double value, int offset) { return __shfl_down_sync(0xffffffffu, value, offset); }

__device__ inline Welford shfl_down(const Welford& value, int offset) {
  return {shfl_down(value.count, offset), shfl_down(value.mean, offset), shfl_down(value.m2, offset)};
}

// Reduces one value per thread over the block; every thread gets the result.
template <typename T, typename Op>
__device__ T block_allreduce(T value, Op op) {
  __shared__ T warp_results[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, shfl_down(value, offset));
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = warp_results[0];
    for (int w = 1; w < kWarps; ++w) total = op(total, warp_results[w]);
    warp_results[0] = total;
  }
  __syncthreads();
  const T result = warp_results[0];
  __syncthreads();  // warp_results is reused by the next call
  return result;
}

// log(r + eps) and r / (r + eps) from log r, without forming r (overflows when q is tiny).
__device__ inline void log_ratio_eps(float log_ratio, float log_eps, float& log_term, float& share) {
  const float diff = log_ratio - log_eps;
  const float e = expf(-fabsf(diff));
  log_term = fmaxf(log_ratio, log_eps) + log1pf(e);
  share = (diff >= 0.0f ? 1.0f : e) / (1.0f + e);
  if (isnan(log_ratio)) log_term = log_ratio;  // fmaxf drops NaN
}

template <typename scalar_t>
__global__ void _kepler_kl_fwd_kernel(const scalar_t* __restrict__ x, const float* __restrict__ logq,
                                     float* __restrict__ loss, float* __restrict__ stats, int64_t num_cols,
                                     int64_t stride_xb, int64_t stride_xm, int64_t stride_qb, int64_t stride_qm,
                                     float log_eps, bool has_eps, bool use_std) {
  const int64_t row = blockIdx.x;
  const scalar_t* x_row = x + row * stride_xb;
  const float* q_row = logq + row * stride_qb;

  // (1) moments, max, min.
  Welford moments{0.0, 0.0, 0.0};
  float hi = -INFINITY, lo = INFINITY;
  for (int64_t i = threadIdx.x; i < num_cols; i += kThreads) {
    const float v = static_cast<float>(x_row[i * stride_xm]);
    moments.count += 1.0;
    const double delta = v - moments.mean;
    moments.mean += delta / moments.count;
    moments.m2 += delta * (v - moments.mean);
    hi = fmaxf(hi, v);
    lo = fminf(lo, v);
  }
  moments = block_allreduce(moments, WelfordMerge());
  hi = block_allreduce(hi, Max());
  lo = block_allreduce(lo, Min());
  // M2 / max(M - 1, 1), as the reference: M2 is 0 for one finite element and NaN for a NaN one.
  const double variance = moments.m2 / static_cast<double>(num_cols > 1 ? num_cols - 1 : 1);
  float scale = static_cast<float>(use_std ? sqrt(variance) : variance);
  // One element or all equal: s = 0. A NaN row (M == 1 included) keeps its NaN scale, so the loss
  // and the gradient are NaN. Any other row's divisor is floored at fp32's smallest normal number
  // (2**-126), so that 1 / scale stays finite (the reference's MIN_DIVISOR_EXPONENT says why).
  const bool degenerate = !isnan(scale) && (num_cols == 1 || hi == lo);
  scale = degenerate ? 0.0f : (scale < FLT_MIN ? FLT_MIN : scale);  // NaN stays NaN (fmaxf would drop it)
  const float inv_scale = degenerate ? 0.0f : 1.0f / scale;

  // (2) logsumexp of u = s - max s = (x - hi) * inv_scale. Never s = (x - mean) * inv_scale: in
  // official mode |s| ~ 1 / scale (1e10 for x ~ 1e-10), and s - logsumexp(s) loses the O(1)
  // log-probabilities to s's rounding (worse with the FMA contraction of `s * inv - shift`): the
  // loss exploded. u is exactly 0 at the max, its error relative to |u| where exp(u) is ~0.
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < num_cols; i += kThreads) {
    acc += expf((static_cast<float>(x_row[i * stride_xm]) - hi) * inv_scale);
  }
  const float lse = logf(block_allreduce(acc, Sum()));

  // (3) sum_i p_i log(p_i / q_i + eps).
  acc = 0.0f;
  for (int64_t i = threadIdx.x; i < num_cols; i += kThreads) {
    const float log_p = (static_cast<float>(x_row[i * stride_xm]) - hi) * inv_scale - lse;
    const float log_ratio = log_p - q_row[i * stride_qm];
    float term = log_ratio;
    if (has_eps) {
      float share;
      log_ratio_eps(log_ratio, log_eps, term, share);
    }
    acc += expf(log_p) * term;
  }
  acc = block_allreduce(acc, Sum());
  if (threadIdx.x == 0) {
    loss[row] = acc;
    stats[row * 3 + 0] = hi;
    stats[row * 3 + 1] = scale;
    stats[row * 3 + 2] = lse;
  }
}

// g_i = dL/dp_i = log(r_i + eps) + r_i / (r_i + eps), r_i = p_i / q_i.
__device__ inline float dloss_dp(float log_ratio, float log_eps, bool has_eps) {
  if (!has_eps) return log_ratio + 1.0f;
  float log_term, share;
  log_ratio_eps(log_ratio, log_eps, log_term, share);
  return log_term + share;
}

template <typename scalar_t>
__global__ void _kepler_kl_bwd_kernel(const float* __restrict__ grad_loss, const scalar_t* __restrict__ x,
                                     const float* __restrict__ logq, const float* __restrict__ stats,
                                     scalar_t* __restrict__ grad, int64_t num_cols, int64_t stride_xb,
                                     int64_t stride_xm, int64_t stride_qb, int64_t stride_qm, float log_eps,
                                     bool has_eps, bool use_std) {
  const int64_t row = blockIdx.x;
  const scalar_t* x_row = x + row * stride_xb;
  const float* q_row = logq + row * stride_qb;
  scalar_t* grad_row = grad + row * num_cols;
  const float hi = stats[row * 3 + 0];
  const float scale = stats[row * 3 + 1];
  const float lse = stats[row * 3 + 2];
  const float inv_scale = scale == 0.0f ? 0.0f : 1.0f / scale;
  if (inv_scale == 0.0f) {  // degenerate row: zero gradient
    for (int64_t i = threadIdx.x; i < num_cols; i += kThreads) grad_row[i] = static_cast<scalar_t>(0.0f);
    return;
  }
  // The sums take s as u - pivot (S and s_k - s_mean do not change), pivot near the p-weighted
  // mean of u so that sum p s g - g_mean sum p s does not cancel away a large offset: lse - log M
  // (that mean for a uniform p) while lse > log(M) / 2 (p spread out), else 0 (p on a few
  // elements near u = 0; exactly 0 keeps S exactly 0 for a one-hot p, as in the reference).
  const float log_cols = logf(static_cast<float>(num_cols));
  // Below 2**-20 * log M, lse - log M is rounding noise of lse (p uniform to rounding, u all near
  // 0, e.g. x ~ 1e19 in official mode), far larger than the spread of u: 0 is as near the mean.
  const bool spread = lse > 0.5f * log_cols && fabsf(lse - log_cols) > 0x1p-20f * log_cols;
  const float pivot = spread ? lse - log_cols : 0.0f;

  // (1) sums over the row.
  float sp = 0.0f, spg = 0.0f, sps = 0.0f, spsg = 0.0f, ss = 0.0f;
  for (int64_t i = threadIdx.x; i < num_cols; i += kThreads) {
    const float u = (static_cast<float>(x_row[i * stride_xm]) - hi) * inv_scale;
    const float p = expf(u - lse);
    const float g = dloss_dp(u - lse - q_row[i * stride_qm], log_eps, has_eps);
    const float s = u - pivot;
    sp += p;
    spg += p * g;
    sps += p * s;
    spsg += p * s * g;
    ss += s;
  }
  sp = block_allreduce(sp, Sum());
  spg = block_allreduce(spg, Sum());
  sps = block_allreduce(sps, Sum());
  spsg = block_allreduce(spsg, Sum());
  ss = block_allreduce(ss, Sum());
  const float g_mean = spg / sp;
  // S = sum_i d_i s_i with d_i = G p_i (g_i - g_mean) / sum p; see kepler/ops/kepler_kl.py. Taken
  // over u instead of s: as sum_i d_i = 0, S and s_k - s_mean are the same.
  const float s_dot_d = grad_loss[row] * (spsg - g_mean * sps) / sp;
  const float per_dof = s_dot_d / static_cast<float>(num_cols - 1);
  const float coef_p = grad_loss[row] / sp * inv_scale;
  const float coef_s = use_std ? per_dof * inv_scale : 2.0f * per_dof;
  const float s_mean = ss / static_cast<float>(num_cols);

  // (2) grad_k = coef_p p_k (g_k - g_mean) - coef_s (s_k - s_mean)
  for (int64_t i = threadIdx.x; i < num_cols; i += kThreads) {
    const float u = (static_cast<float>(x_row[i * stride_xm]) - hi) * inv_scale;
    const float p = expf(u - lse);
    const float g = dloss_dp(u - lse - q_row[i * stride_qm], log_eps, has_eps);
    const float s = u - pivot;
    grad_row[i] = static_cast<scalar_t>(coef_p * p * (g - g_mean) - coef_s * (s - s_mean));
  }
}

inline float log_of_eps(double eps) { return eps > 0.0 ? static_cast<float>(std::log(eps)) : 0.0f; }

inline int64_t prior_row_stride(const at::Tensor& prior_logq) {
  return prior_logq.size(0) == 1 ? 0 : prior_logq.stride(0);
}

std::tuple<at::Tensor, at::Tensor> kepler_kl_cuda(const at::Tensor& x, const at::Tensor& prior_logq, bool use_std,
                                                  double eps) {
  check_kepler_kl_inputs(x, prior_logq, eps, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t num_rows = x.size(0), num_cols = x.size(1);
  at::Tensor loss = at::empty({num_rows}, x.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({num_rows, 3}, x.options().dtype(at::kFloat));
  if (num_rows == 0) return {loss, stats};
  TORCH_CHECK(num_rows <= 2147483647, "kepler::kepler_kl: at most 2**31 - 1 rows, got ", num_rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KEPLER_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "kepler_kl_cuda", [&] {
    _kepler_kl_fwd_kernel<scalar_t><<<static_cast<unsigned int>(num_rows), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), prior_logq.const_data_ptr<float>(), loss.mutable_data_ptr<float>(),
        stats.mutable_data_ptr<float>(), num_cols, x.stride(0), x.stride(1), prior_row_stride(prior_logq),
        prior_logq.stride(1), log_of_eps(eps), eps > 0.0, use_std);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor kepler_kl_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& x, const at::Tensor& prior_logq,
                                   const at::Tensor& stats_in, bool use_std, double eps) {
  check_kepler_kl_backward_inputs(grad_loss_in, x, prior_logq, stats_in, eps, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t num_rows = x.size(0), num_cols = x.size(1);
  at::Tensor grad = at::empty({num_rows, num_cols}, x.options());
  if (num_rows == 0) return grad;
  TORCH_CHECK(num_rows <= 2147483647, "kepler::kepler_kl_backward: at most 2**31 - 1 rows, got ", num_rows);
  const at::Tensor grad_loss = grad_loss_in.to(at::kFloat).contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KEPLER_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "kepler_kl_backward_cuda", [&] {
    _kepler_kl_bwd_kernel<scalar_t><<<static_cast<unsigned int>(num_rows), kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<float>(), x.const_data_ptr<scalar_t>(), prior_logq.const_data_ptr<float>(),
        stats.const_data_ptr<float>(), grad.mutable_data_ptr<scalar_t>(), num_cols, x.stride(0), x.stride(1),
        prior_row_stride(prior_logq), prior_logq.stride(1), log_of_eps(eps), eps > 0.0, use_std);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CUDA, m) {
  m.impl("kepler_kl", &kepler::kepler_kl_cuda);
  m.impl("kepler_kl_backward", &kepler::kepler_kl_backward_cuda);
}
