// CUDA kernels of kepler::nearest_codeword(z (G, N, D), codebook (Gc, K, D)) -> (indices, sq_dist).
//
// Three launches on the current stream:
//   1. _code_norms_kernel: ||e||^2 of every codeword in float32, once per call.
//   2. _nearest_codeword_kernel: one thread block per (BLOCK_N rows of z, group); it scans the
//      whole codebook in BLOCK_K-code tiles. z and code tiles of BLOCK_D dimensions are upcast to
//      float32 while they are loaded into shared memory (bfloat16/float16 are never copied to
//      float32 in global memory). A 16 x 16 thread grid computes 4 x 4 scores per thread,
//      ||e||^2 - 2 z.e with float32 accumulation, and keeps a running (score, index) per row in
//      registers with a strict `<` while k grows, skipping non-finite scores. The 16 threads that
//      share a row then reduce with the lowest-index tie-break (warp shuffles).
//   3. _winner_sq_dist_kernel: the winner's distance recomputed exactly as sum_d (z_d - e_d)^2 in
//      float32.
// Inputs are read through their strides (no .contiguous() copy); offsets are int64.
//
// No tensor-core path: the scores are scalar float32 FMAs on the shared-memory tiles, for every
// input dtype (16-bit inputs are upcast in shared memory, not fed to mma/wmma). The Triton kernel
// (kernels/nearest_codeword.py) uses tl.dot, so on a GPU it is expected to be the faster of the
// two for bfloat16/float16, and auto prefers it (kepler/_backend.py).
#include "nearest_codeword/nearest_codeword_checks.h"
#include "common/dispatch.h"

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace kepler {
namespace {

constexpr int kBlockN = 64;  // rows of z per thread block
constexpr int kBlockK = 64;  // codes per tile
constexpr int kBlockD = 16;  // dimensions per shared-memory tile
constexpr int kThreadsPerSide = 16;
constexpr int kThreads = kThreadsPerSide * kThreadsPerSide;
constexpr int kRowsPerThread = kBlockN / kThreadsPerSide;   // 4
constexpr int kCodesPerThread = kBlockK / kThreadsPerSide;  // 4
constexpr int kTilePad = 4;  // keeps float4 alignment, spreads the transposing stores over banks
constexpr int kMaxGroups = 65535;  // gridDim.y

template <typename scalar_t>
__global__ void _code_norms_kernel(const scalar_t* __restrict__ codebook, int64_t stride_g, int64_t stride_k,
                                   int64_t stride_d, int64_t num_codes, int64_t dim, int64_t total,
                                   float* __restrict__ norms) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const scalar_t* e = codebook + (i / num_codes) * stride_g + (i % num_codes) * stride_k;
  float norm = 0.f;
  for (int64_t d = 0; d < dim; ++d) {
    const float value = static_cast<float>(e[d * stride_d]);
    norm = fmaf(value, value, norm);
  }
  norms[i] = norm;
}

// Takes (other_score, other_index) when it is lower, or equal with a lower index.
__device__ __forceinline__ void take_better(float& score, int32_t& index, float other_score, int32_t other_index) {
  if (other_score < score || (other_score == score && other_index < index)) {
    score = other_score;
    index = other_index;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _nearest_codeword_kernel(const scalar_t* __restrict__ z, int64_t stride_zg, int64_t stride_zn, int64_t stride_zd,
                             const scalar_t* __restrict__ codebook, int64_t stride_eg, int64_t stride_ek,
                             int64_t stride_ed, const float* __restrict__ code_norms, int64_t num_rows,
                             int64_t num_codes, int64_t dim, bool shared_codebook, int64_t* __restrict__ indices) {
  // Tiles are stored [d][row] / [d][code] so each thread reads its 4 rows / 4 codes as a float4.
  __shared__ __align__(16) float z_tile[kBlockD][kBlockN + kTilePad];
  __shared__ __align__(16) float code_tile[kBlockD][kBlockK + kTilePad];
  __shared__ float norm_tile[kBlockK];

  const int group = blockIdx.y;
  const int code_group = shared_codebook ? 0 : group;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int tx = threadIdx.x % kThreadsPerSide;  // picks the codes
  const int ty = threadIdx.x / kThreadsPerSide;  // picks the rows
  const scalar_t* z_group = z + group * stride_zg;
  const scalar_t* codes = codebook + code_group * stride_eg;
  const float* norms = code_norms + code_group * num_codes;

  float best_score[kRowsPerThread];
  int32_t best_index[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    best_score[i] = INFINITY;
    best_index[i] = 0;  // kept by a row without any finite score
  }

  for (int64_t code_begin = 0; code_begin < num_codes; code_begin += kBlockK) {
    float acc[kRowsPerThread][kCodesPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kCodesPerThread; ++j) acc[i][j] = 0.f;
    }
    if (threadIdx.x < kBlockK) {
      const int64_t k = code_begin + threadIdx.x;
      norm_tile[threadIdx.x] = k < num_codes ? norms[k] : 0.f;
    }
    __syncthreads();  // norm_tile is read after the D loop, which D = 0 skips

    for (int64_t d_begin = 0; d_begin < dim; d_begin += kBlockD) {
      // Consecutive threads load consecutive d of one row: coalesced for contiguous rows.
      for (int t = threadIdx.x; t < kBlockN * kBlockD; t += kThreads) {
        const int r = t / kBlockD;
        const int dd = t % kBlockD;
        const int64_t row = row_begin + r;
        const int64_t d = d_begin + dd;
        z_tile[dd][r] = (row < num_rows && d < dim) ? static_cast<float>(z_group[row * stride_zn + d * stride_zd]) : 0.f;
      }
      for (int t = threadIdx.x; t < kBlockK * kBlockD; t += kThreads) {
        const int c = t / kBlockD;
        const int dd = t % kBlockD;
        const int64_t k = code_begin + c;
        const int64_t d = d_begin + dd;
        code_tile[dd][c] = (k < num_codes && d < dim) ? static_cast<float>(codes[k * stride_ek + d * stride_ed]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < kBlockD; ++dd) {
        const float4 zv = *reinterpret_cast<const float4*>(&z_tile[dd][ty * kRowsPerThread]);
        const float4 ev = *reinterpret_cast<const float4*>(&code_tile[dd][tx * kCodesPerThread]);
        const float zr[kRowsPerThread] = {zv.x, zv.y, zv.z, zv.w};
        const float ec[kCodesPerThread] = {ev.x, ev.y, ev.z, ev.w};
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kCodesPerThread; ++j) acc[i][j] = fmaf(zr[i], ec[j], acc[i][j]);
        }
      }
      __syncthreads();  // the tiles are overwritten next
    }

    // This thread's codes come in increasing k, so a strict `<` keeps the lowest index on ties.
#pragma unroll
    for (int j = 0; j < kCodesPerThread; ++j) {
      const int c = tx * kCodesPerThread + j;
      const int64_t k = code_begin + c;
      if (k < num_codes) {
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const float score = fmaf(-2.f, acc[i][j], norm_tile[c]);
          if (isfinite(score) && score < best_score[i]) {
            best_score[i] = score;
            best_index[i] = static_cast<int32_t>(k);
          }
        }
      }
    }
    __syncthreads();  // norm_tile is rewritten by the next tile
  }

  // The 16 threads of a row are 16 consecutive lanes of one warp (tx = lane % 16).
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int offset = kThreadsPerSide / 2; offset > 0; offset /= 2) {
      const float other_score = __shfl_xor_sync(0xffffffffu, best_score[i], offset);
      const int32_t other_index = __shfl_xor_sync(0xffffffffu, best_index[i], offset);
      take_better(best_score[i], best_index[i], other_score, other_index);
    }
    const int64_t row = row_begin + ty * kRowsPerThread + i;
    if (tx == 0 && row < num_rows) indices[group * num_rows + row] = best_index[i];
  }
}

template <typename scalar_t>
__global__ void _winner_sq_dist_kernel(const scalar_t* __restrict__ z, int64_t stride_zg, int64_t stride_zn,
                                       int64_t stride_zd, const scalar_t* __restrict__ codebook, int64_t stride_eg,
                                       int64_t stride_ek, int64_t stride_ed, int64_t num_rows, int64_t dim,
                                       bool shared_codebook, int64_t total, const int64_t* __restrict__ indices,
                                       float* __restrict__ sq_dist) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t group = i / num_rows;
  const scalar_t* zr = z + group * stride_zg + (i % num_rows) * stride_zn;
  const scalar_t* e = codebook + (shared_codebook ? 0 : group) * stride_eg + indices[i] * stride_ek;
  float sum = 0.f;
  for (int64_t d = 0; d < dim; ++d) {
    const float diff = static_cast<float>(zr[d * stride_zd]) - static_cast<float>(e[d * stride_ed]);
    sum = fmaf(diff, diff, sum);
  }
  sq_dist[i] = sum;
}

template <typename scalar_t>
void launch(const at::Tensor& z, const at::Tensor& codebook, at::Tensor& indices, at::Tensor& sq_dist) {
  const int64_t groups = z.size(0), rows = z.size(1), dim = z.size(2);
  const int64_t code_groups = codebook.size(0), codes = codebook.size(1);
  const bool shared_codebook = code_groups == 1;
  const auto* z_data = z.data_ptr<scalar_t>();
  const auto* codebook_data = codebook.data_ptr<scalar_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kFlatThreads = 256;

  auto code_norms = at::empty({code_groups, codes}, codebook.options().dtype(at::kFloat));
  const int64_t total_codes = code_groups * codes;
  _code_norms_kernel<scalar_t><<<at::ceil_div<int64_t>(total_codes, kFlatThreads), kFlatThreads, 0, stream>>>(
      codebook_data, codebook.stride(0), codebook.stride(1), codebook.stride(2), codes, dim, total_codes,
      code_norms.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 grid(static_cast<unsigned int>(at::ceil_div<int64_t>(rows, kBlockN)), static_cast<unsigned int>(groups));
  _nearest_codeword_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      z_data, z.stride(0), z.stride(1), z.stride(2), codebook_data, codebook.stride(0), codebook.stride(1),
      codebook.stride(2), code_norms.data_ptr<float>(), rows, codes, dim, shared_codebook,
      indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t total_rows = groups * rows;
  _winner_sq_dist_kernel<scalar_t><<<at::ceil_div<int64_t>(total_rows, kFlatThreads), kFlatThreads, 0, stream>>>(
      z_data, z.stride(0), z.stride(1), z.stride(2), codebook_data, codebook.stride(0), codebook.stride(1),
      codebook.stride(2), rows, dim, shared_codebook, total_rows, indices.data_ptr<int64_t>(),
      sq_dist.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> nearest_codeword_cuda(const at::Tensor& z, const at::Tensor& codebook) {
  check_nearest_codeword_inputs(z, codebook, c10::DeviceType::CUDA);
  TORCH_CHECK(z.size(0) <= kMaxGroups, "kepler::nearest_codeword: at most ", kMaxGroups, " groups G, got G=",
              z.size(0));
  TORCH_CHECK(z.size(1) / kBlockN < (int64_t{1} << 31), "kepler::nearest_codeword: too many rows N=", z.size(1));
  const c10::cuda::CUDAGuard device_guard(z.device());
  auto indices = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kLong));
  auto sq_dist = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, sq_dist};
  KEPLER_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "nearest_codeword_cuda", [&] {
    launch<scalar_t>(z, codebook, indices, sq_dist);
  });
  return {indices, sq_dist};
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CUDA, m) { m.impl("nearest_codeword", &kepler::nearest_codeword_cuda); }
