// Launcher checks shared by the CPU and CUDA kernels of kepler::nearest_codeword.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace kepler {

// Validates the arguments of nearest_codeword(z, codebook) with messages naming the argument:
// z (G, N, D) and codebook (Gc, K, D) with Gc in {1, G}, K >= 1, one dtype among float32 /
// bfloat16 / float16, one device. Indices are kept as int32 inside the kernels, hence K < 2**31.
inline void check_nearest_codeword_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.dim() == 3, "nearest_codeword: z must be 3-D (G, N, D), got a ", z.dim(), "-D tensor");
  TORCH_CHECK(codebook.dim() == 3, "nearest_codeword: codebook must be 3-D (Gc, K, D), got a ", codebook.dim(),
              "-D tensor");
  TORCH_CHECK(z.size(2) == codebook.size(2), "nearest_codeword: z and codebook must have the same D, got z D=",
              z.size(2), " and codebook D=", codebook.size(2));
  TORCH_CHECK(codebook.size(0) == 1 || codebook.size(0) == z.size(0),
              "nearest_codeword: codebook groups Gc must be 1 or G=", z.size(0), ", got Gc=", codebook.size(0));
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(),
              "nearest_codeword: z and codebook must have the same dtype, got ", z.scalar_type(), " and ",
              codebook.scalar_type());
  const auto dtype = z.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "nearest_codeword: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(z.device() == codebook.device(), "nearest_codeword: z and codebook must be on the same device, got ",
              z.device(), " and ", codebook.device());
  TORCH_CHECK(codebook.size(1) >= 1, "nearest_codeword: codebook must hold at least one codeword (K >= 1), got K=0");
  TORCH_CHECK(codebook.size(1) <= std::numeric_limits<int32_t>::max(),
              "nearest_codeword: codebook size K must be below 2**31, got K=", codebook.size(1));
}

}  // namespace kepler
