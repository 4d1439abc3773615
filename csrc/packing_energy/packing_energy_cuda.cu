// CUDA kernels of kepler::packing_energy and kepler::packing_energy_backward.
//
// Same contract and math as the CPU kernels (csrc/packing_energy/packing_energy_cpu.cpp):
//   row_lse[g, i] = log sum_{j != i} exp(-t ||y_i - y_j||^2),  energy[g] = logsumexp_i row_lse - log(K(K-1)),
//   dE/dy_i = coef_i * (y_i sum_j q_ij - sum_j q_ij y_j),  q_ij = exp(-t d_ij - row_lse_i),
//   coef_i = grad_energy * (-4t) * exp(row_lse_i - energy - log(K(K-1))).
//
// Written to be simple and correct rather than fast: one thread per row i, kRows rows per block;
// the codewords are streamed through shared memory in tiles of kTileJ codewords x kChunkD
// coordinates, and every thread keeps an online log-sum-exp over its row (no K x K matrix;
// memory is the codebook plus O(K)). Distances are exact sums of squared differences accumulated
// in acc_t (float for float/half/bfloat16, double for double). The backward gives each block one
// kChunkD-wide slice of the output (grid z) and recomputes the distances for it.
#include "packing_energy/packing_energy_checks.h"
#include "common/dispatch.h"

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

namespace kepler {
namespace {

constexpr int kRows = 128;   // threads (rows i) per block
constexpr int kTileJ = 32;   // codewords j per shared-memory tile
constexpr int kChunkD = 32;  // coordinates per shared-memory tile

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// max(a, b), NaN when either is NaN, as torch.logsumexp propagates NaN. A plain `a > b ? a : b`
// drops a NaN a: a row whose scores are all NaN would then look fully masked (max -inf) and get
// row_lse = -inf instead of NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

struct PointsView {
  int64_t K, dim, stride_g, stride_k, stride_d;
};

// Stages coordinates [k0, k0 + kChunkD) of this block's rows and of codewords [j0, j0 + kTileJ)
// into shared memory (zeros outside K and d).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_chunk(const scalar_t* __restrict__ y_g, const PointsView& v, int64_t i0,
                                            int64_t j0, int64_t k0, acc_t (*rows)[kChunkD + 1],
                                            acc_t (*cols)[kChunkD + 1]) {
  for (int e = threadIdx.x; e < kRows * kChunkD; e += blockDim.x) {
    const int r = e / kChunkD, k = e % kChunkD;
    const int64_t i = i0 + r, kk = k0 + k;
    rows[r][k] = (i < v.K && kk < v.dim) ? static_cast<acc_t>(y_g[i * v.stride_k + kk * v.stride_d]) : acc_t(0);
  }
  for (int e = threadIdx.x; e < kTileJ * kChunkD; e += blockDim.x) {
    const int c = e / kChunkD, k = e % kChunkD;
    const int64_t j = j0 + c, kk = k0 + k;
    cols[c][k] = (j < v.K && kk < v.dim) ? static_cast<acc_t>(y_g[j * v.stride_k + kk * v.stride_d]) : acc_t(0);
  }
}

// scores[c] = -t ||y_i - y_{j0 + c}||^2 for this thread's row i, -inf on the diagonal and past K.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_scores(const scalar_t* __restrict__ y_g, const PointsView& v, int64_t i0,
                                            int64_t j0, acc_t neg_t, acc_t (*rows)[kChunkD + 1],
                                            acc_t (*cols)[kChunkD + 1], acc_t* scores) {
  for (int c = 0; c < kTileJ; ++c) scores[c] = acc_t(0);
  for (int64_t k0 = 0; k0 < v.dim; k0 += kChunkD) {
    __syncthreads();  // previous users of the shared tiles are done
    stage_chunk(y_g, v, i0, j0, k0, rows, cols);
    __syncthreads();
    const int chunk = static_cast<int>(v.dim - k0 < kChunkD ? v.dim - k0 : kChunkD);
    for (int k = 0; k < chunk; ++k) {
      const acc_t a = rows[threadIdx.x][k];
#pragma unroll
      for (int c = 0; c < kTileJ; ++c) {
        const acc_t diff = a - cols[c][k];
        scores[c] += diff * diff;
      }
    }
  }
  const int64_t i = i0 + threadIdx.x;
#pragma unroll
  for (int c = 0; c < kTileJ; ++c) {
    const int64_t j = j0 + c;
    scores[c] = (j < v.K && j != i) ? neg_t * scores[c] : static_cast<acc_t>(-INFINITY);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRows) _packing_energy_fwd_kernel(const scalar_t* __restrict__ y, PointsView v,
                                                                   acc_t neg_t, acc_t* __restrict__ row_lse) {
  __shared__ acc_t rows[kRows][kChunkD + 1];
  __shared__ acc_t cols[kTileJ][kChunkD + 1];
  const int64_t g = blockIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const scalar_t* y_g = y + g * v.stride_g;
  constexpr acc_t kNegInf = static_cast<acc_t>(-INFINITY);
  acc_t running_max = kNegInf, running_sum = 0;
  acc_t scores[kTileJ];
  for (int64_t j0 = 0; j0 < v.K; j0 += kTileJ) {
    tile_scores(y_g, v, i0, j0, neg_t, rows, cols, scores);
    acc_t tile_max = kNegInf;
#pragma unroll
    for (int c = 0; c < kTileJ; ++c) tile_max = nan_max(scores[c], tile_max);
    if (tile_max == kNegInf) continue;  // nothing unmasked in this tile for this row
    const acc_t new_max = nan_max(running_max, tile_max);
    acc_t tile_sum = 0;
#pragma unroll
    for (int c = 0; c < kTileJ; ++c) tile_sum += exp_acc(scores[c] - new_max);
    running_sum = running_sum * exp_acc(running_max - new_max) + tile_sum;
    running_max = new_max;
  }
  const int64_t i = i0 + threadIdx.x;
  if (i < v.K) row_lse[g * v.K + i] = running_max + log_acc(running_sum);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRows) _packing_energy_bwd_kernel(const scalar_t* __restrict__ y, PointsView v,
                                                                   acc_t neg_t, const acc_t* __restrict__ row_lse,
                                                                   const acc_t* __restrict__ coef,
                                                                   scalar_t* __restrict__ grad) {
  __shared__ acc_t rows[kRows][kChunkD + 1];
  __shared__ acc_t cols[kTileJ][kChunkD + 1];
  const int64_t g = blockIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t out0 = static_cast<int64_t>(blockIdx.z) * kChunkD;  // this block's output coordinates
  const int64_t i = i0 + threadIdx.x;
  const scalar_t* y_g = y + g * v.stride_g;
  const acc_t lse = i < v.K ? row_lse[g * v.K + i] : acc_t(0);
  acc_t weight_sum = 0;
  acc_t weighted[kChunkD];
#pragma unroll
  for (int k = 0; k < kChunkD; ++k) weighted[k] = 0;
  acc_t q[kTileJ];
  for (int64_t j0 = 0; j0 < v.K; j0 += kTileJ) {
    tile_scores(y_g, v, i0, j0, neg_t, rows, cols, q);
#pragma unroll
    for (int c = 0; c < kTileJ; ++c) {
      const acc_t x = q[c] - lse;  // <= 0 up to rounding; masked entries give exp(-inf) = 0
      q[c] = exp_acc(x > acc_t(0) ? acc_t(0) : x);  // clamped so that NaN stays NaN
      weight_sum += q[c];
    }
    __syncthreads();
    stage_chunk(y_g, v, i0, j0, out0, rows, cols);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kTileJ; ++c) {
#pragma unroll
      for (int k = 0; k < kChunkD; ++k) weighted[k] += q[c] * cols[c][k];
    }
  }
  if (i >= v.K) return;  // after the last __syncthreads
  const acc_t row_coef = coef[g * v.K + i];
  scalar_t* grad_i = grad + (g * v.K + i) * v.dim;
#pragma unroll
  for (int k = 0; k < kChunkD; ++k) {
    if (out0 + k < v.dim) {
      grad_i[out0 + k] = static_cast<scalar_t>(row_coef * (rows[threadIdx.x][k] * weight_sum - weighted[k]));
    }
  }
}

// Groups go to gridDim.y and (backward) coordinate chunks to gridDim.z, each at most 65535.
void check_grid_limits(const char* op, const at::Tensor& y) {
  TORCH_CHECK(y.size(0) <= 65535, op, ": at most 65535 groups, got G=", y.size(0));
  TORCH_CHECK(at::ceil_div<int64_t>(y.size(2), kChunkD) <= 65535, op, ": d too large, got d=", y.size(2));
}

PointsView view_of(const at::Tensor& y) {
  return {y.size(1), y.size(2), y.stride(0), y.stride(1), y.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> packing_energy_cuda(const at::Tensor& y, double t) {
  check_packing_energy_inputs(y, t, c10::DeviceType::CUDA);
  check_grid_limits("kepler::packing_energy", y);
  const c10::cuda::CUDAGuard device_guard(y.device());
  const int64_t G = y.size(0), K = y.size(1);
  at::Tensor row_lse = at::empty({G, K}, y.options().dtype(accumulate_type(y.scalar_type())));
  if (G > 0) {
    const dim3 grid(static_cast<unsigned>((K + kRows - 1) / kRows), static_cast<unsigned>(G));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    KEPLER_DISPATCH_KERNEL_DTYPES_AND_DOUBLE(y.scalar_type(), "packing_energy_cuda", [&] {
      using acc_t = accumulate_t<scalar_t>;
      _packing_energy_fwd_kernel<scalar_t, acc_t><<<grid, kRows, 0, stream>>>(
          y.data_ptr<scalar_t>(), view_of(y), static_cast<acc_t>(-t), row_lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor energy = at::logsumexp(row_lse, {1}) - std::log(static_cast<double>(K) * static_cast<double>(K - 1));
  return {energy, row_lse};
}

at::Tensor packing_energy_backward_cuda(const at::Tensor& grad_energy, const at::Tensor& y, double t,
                                        const at::Tensor& energy, const at::Tensor& row_lse) {
  check_packing_energy_backward_inputs(grad_energy, y, t, energy, row_lse, c10::DeviceType::CUDA);
  check_grid_limits("kepler::packing_energy_backward", y);
  const c10::cuda::CUDAGuard device_guard(y.device());
  const int64_t G = y.size(0), K = y.size(1), dim = y.size(2);
  const auto acc_type = accumulate_type(y.scalar_type());
  const at::Tensor lse = row_lse.to(acc_type).contiguous();
  const double log_pairs = std::log(static_cast<double>(K) * static_cast<double>(K - 1));
  const at::Tensor log_total = energy.to(acc_type).unsqueeze(1) + log_pairs;
  const at::Tensor coef = ((lse - log_total).exp() * grad_energy.to(acc_type).unsqueeze(1) * (-4.0 * t)).contiguous();
  at::Tensor grad = at::empty({G, K, dim}, y.options());
  if (G > 0) {
    const dim3 grid(static_cast<unsigned>((K + kRows - 1) / kRows), static_cast<unsigned>(G),
                    static_cast<unsigned>((dim + kChunkD - 1) / kChunkD));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    KEPLER_DISPATCH_KERNEL_DTYPES_AND_DOUBLE(y.scalar_type(), "packing_energy_backward_cuda", [&] {
      using acc_t = accumulate_t<scalar_t>;
      _packing_energy_bwd_kernel<scalar_t, acc_t><<<grid, kRows, 0, stream>>>(
          y.data_ptr<scalar_t>(), view_of(y), static_cast<acc_t>(-t), lse.data_ptr<acc_t>(), coef.data_ptr<acc_t>(),
          grad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad;
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CUDA, m) {
  m.impl("packing_energy", &kepler::packing_energy_cuda);
  m.impl("packing_energy_backward", &kepler::packing_energy_backward_cuda);
}
