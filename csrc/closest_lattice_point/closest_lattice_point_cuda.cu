// CUDA kernel of kepler::closest_lattice_point(x (N, n), lattice) -> (N, n) float32.
//
// One thread per row: the work per row is a few dozen float operations on n <= 8 coordinates
// (any n for Z^n and D_n), so the kernel is bound by memory traffic, and a row per thread keeps
// it as plain as the reference. Coordinates are read through x's strides and upcast to float32 in
// registers; offsets are int64.
//
// Numerics are the reference's (kepler/reference/closest_lattice_point.py), bit for bit: rintf
// rounds to nearest even; every product, sum and quotient is rounded on its own (__fmul_rn,
// __fadd_rn, __fsub_rn, __fdiv_rn), because nvcc would otherwise contract a * b + c into a fused
// multiply-add and pick other points (A2's round(x / s) * s + h, the squared distances).
//
// D_n makes two passes over the row: the first finds the parity, the coordinate rounding moved
// furthest and its direction; the second writes the rounded row with that coordinate moved (so
// a run-time n needs no per-thread array). A non-finite coordinate makes its residual
// x - round(x) NaN, a finite one keeps it within 1/2: a row's residual sum is NaN exactly when the
// row must come out NaN.
#include "closest_lattice_point/closest_lattice_point_checks.h"
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
#include <string>

namespace kepler {
namespace {

constexpr int kThreads = 256;

// float32(sqrt(3)), A2's row spacing in the reference's float32 arithmetic, and half of it (exact).
constexpr float kRoot3 = 1.7320508075688772f;
constexpr float kHalfRoot3 = kRoot3 / 2;

template <typename scalar_t>
struct Row {
  const scalar_t* data;
  int64_t stride_d;

  __device__ __forceinline__ float operator[](int64_t c) const { return static_cast<float>(data[c * stride_d]); }
};

// What D_n(v) does to round(v), v = row - shift: the coordinate it moves one step, if `odd`.
struct CheckerboardMove {
  float residual_sum;   // NaN for a non-finite row
  int64_t worst_index;  // the first coordinate of largest |v - round(v)|
  float step;           // +1 when that residual is >= 0, else -1
  bool odd;             // an odd count of odd coordinates in round(v)
};

template <int kDim, typename scalar_t>
__device__ __forceinline__ CheckerboardMove checkerboard_move(const Row<scalar_t>& row, int64_t dim, float shift) {
  const int64_t n = kDim > 0 ? kDim : dim;
  CheckerboardMove move{0.0f, 0, 1.0f, false};
  float worst = -1.0f;
#pragma unroll
  for (int64_t c = 0; c < n; ++c) {
    const float v = __fsub_rn(row[c], shift);
    const float rounded = rintf(v);
    const float residual = __fsub_rn(v, rounded);
    if (fabsf(residual) > worst) {  // strict: the first of the largest
      worst = fabsf(residual);
      move.worst_index = c;
      move.step = residual >= 0.0f ? 1.0f : -1.0f;
    }
    const float half = __fmul_rn(rounded, 0.5f);  // exact; not an integer exactly when `rounded` is odd
    move.odd ^= rintf(half) != half;
    move.residual_sum = __fadd_rn(move.residual_sum, residual);
  }
  return move;
}

// Coordinate c of D_n(row - shift) + shift.
template <typename scalar_t>
__device__ __forceinline__ float checkerboard_coordinate(const Row<scalar_t>& row, int64_t c, float shift,
                                                         const CheckerboardMove& move) {
  const float rounded = rintf(__fsub_rn(row[c], shift));
  const float point = move.odd && c == move.worst_index ? __fadd_rn(rounded, move.step) : rounded;
  return __fadd_rn(point, shift);
}

__device__ __forceinline__ float squared(float v) { return __fmul_rn(v, v); }

template <LatticeFamily kFamily, int kDim, typename scalar_t>
__global__ void _closest_lattice_point_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t dim,
                                              int64_t stride_n, int64_t stride_d, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const int64_t n = kDim > 0 ? kDim : dim;
  const Row<scalar_t> row{x + i * stride_n, stride_d};
  float* point = out + i * n;
  const float nan = __int_as_float(0x7fffffff);

  if constexpr (kFamily == LatticeFamily::kZ) {
    float residual_sum = 0.0f;
#pragma unroll
    for (int64_t c = 0; c < n; ++c) residual_sum = __fadd_rn(residual_sum, __fsub_rn(row[c], rintf(row[c])));
    const bool finite = !isnan(residual_sum);
#pragma unroll
    for (int64_t c = 0; c < n; ++c) point[c] = finite ? rintf(row[c]) : nan;
  } else if constexpr (kFamily == LatticeFamily::kD) {
    const CheckerboardMove move = checkerboard_move<kDim>(row, dim, 0.0f);
    const bool finite = !isnan(move.residual_sum);
#pragma unroll
    for (int64_t c = 0; c < n; ++c) point[c] = finite ? checkerboard_coordinate(row, c, 0.0f, move) : nan;
  } else if constexpr (kFamily == LatticeFamily::kE8) {
    const CheckerboardMove integral_move = checkerboard_move<8>(row, 8, 0.0f);
    const CheckerboardMove half_move = checkerboard_move<8>(row, 8, 0.5f);
    float integral[8], half_integral[8];
    float integral_sq = 0.0f, half_integral_sq = 0.0f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      integral[c] = checkerboard_coordinate(row, c, 0.0f, integral_move);
      half_integral[c] = checkerboard_coordinate(row, c, 0.5f, half_move);
      integral_sq = __fadd_rn(integral_sq, squared(__fsub_rn(row[c], integral[c])));
      half_integral_sq = __fadd_rn(half_integral_sq, squared(__fsub_rn(row[c], half_integral[c])));
    }
    const bool finite = !isnan(integral_move.residual_sum);
    const bool second = half_integral_sq < integral_sq;
#pragma unroll
    for (int c = 0; c < 8; ++c) point[c] = !finite ? nan : second ? half_integral[c] : integral[c];
  } else {  // A2: the rectangular lattice Z x sqrt(3) Z and its shift by (1/2, sqrt(3)/2)
    const float x0 = row[0], x1 = row[1];
    const float rect0 = rintf(x0), rect1 = __fmul_rn(rintf(__fdiv_rn(x1, kRoot3)), kRoot3);
    const float shifted0 = __fadd_rn(rintf(__fsub_rn(x0, 0.5f)), 0.5f);
    const float shifted1 = __fadd_rn(__fmul_rn(rintf(__fdiv_rn(__fsub_rn(x1, kHalfRoot3), kRoot3)), kRoot3), kHalfRoot3);
    const float rect_sq = __fadd_rn(squared(__fsub_rn(x0, rect0)), squared(__fsub_rn(x1, rect1)));
    const float shifted_sq = __fadd_rn(squared(__fsub_rn(x0, shifted0)), squared(__fsub_rn(x1, shifted1)));
    const bool finite = !isnan(rect_sq);  // NaN exactly for a non-finite row too
    const bool second = shifted_sq < rect_sq;
    point[0] = !finite ? nan : second ? shifted0 : rect0;
    point[1] = !finite ? nan : second ? shifted1 : rect1;
  }
}

template <typename scalar_t>
using KernelFn = void (*)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, float*);

// The kernel of a Z or D family for this n: unrolled for n = 1, 2, 3, 4, 8, a run-time n otherwise.
template <LatticeFamily kFamily, typename scalar_t>
KernelFn<scalar_t> pick_unrolled(int64_t dim) {
  switch (dim) {
    case 1: return &_closest_lattice_point_kernel<kFamily, 1, scalar_t>;
    case 2: return &_closest_lattice_point_kernel<kFamily, 2, scalar_t>;
    case 3: return &_closest_lattice_point_kernel<kFamily, 3, scalar_t>;
    case 4: return &_closest_lattice_point_kernel<kFamily, 4, scalar_t>;
    case 8: return &_closest_lattice_point_kernel<kFamily, 8, scalar_t>;
    default: return &_closest_lattice_point_kernel<kFamily, 0, scalar_t>;
  }
}

template <typename scalar_t>
KernelFn<scalar_t> pick_kernel(LatticeFamily family, int64_t dim) {
  switch (family) {
    case LatticeFamily::kA2: return &_closest_lattice_point_kernel<LatticeFamily::kA2, 2, scalar_t>;
    case LatticeFamily::kE8: return &_closest_lattice_point_kernel<LatticeFamily::kE8, 8, scalar_t>;
    case LatticeFamily::kZ: return pick_unrolled<LatticeFamily::kZ, scalar_t>(dim);
    case LatticeFamily::kD: break;
  }
  return pick_unrolled<LatticeFamily::kD, scalar_t>(dim);
}

at::Tensor closest_lattice_point_cuda(const at::Tensor& x, c10::string_view lattice) {
  const LatticeFamily family =
      check_closest_lattice_point_inputs(x, std::string(lattice.data(), lattice.size()), c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor out = at::empty({rows, dim}, x.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const int64_t blocks = at::ceil_div<int64_t>(rows, kThreads);
  TORCH_CHECK(blocks <= 2147483647, "kepler::closest_lattice_point: at most (2**31 - 1) * ", kThreads,
              " rows, got ", rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KEPLER_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "closest_lattice_point_cuda", [&] {
    pick_kernel<scalar_t>(family, dim)<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), rows, dim, x.stride(0), x.stride(1), out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CUDA, m) { m.impl("closest_lattice_point", &kepler::closest_lattice_point_cuda); }
