// Argument checks of kepler::nearest_codeword, shared by its CPU and CUDA launchers.
#pragma once

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <limits>

namespace kepler {

// z (G, N, D) and codebook (Gc, K, D) with Gc in {1, G}, K >= 1, one kernel dtype, one device of
// `device_type`. Indices are kept as int32 inside the kernels, hence K < 2**31.
inline void check_nearest_codeword_inputs(const at::Tensor& z, const at::Tensor& codebook,
                                          c10::DeviceType device_type) {
  constexpr const char* op = "kepler::nearest_codeword";
  check_dims(op, "z", z, {"G", "N", "D"});
  check_dims(op, "codebook", codebook, {"Gc", "K", "D"});
  TORCH_CHECK(z.size(2) == codebook.size(2), op, ": z and codebook must have the same D, got z D=", z.size(2),
              " and codebook D=", codebook.size(2));
  TORCH_CHECK(codebook.size(0) == 1 || codebook.size(0) == z.size(0), op, ": codebook groups Gc must be 1 or G=",
              z.size(0), ", got Gc=", codebook.size(0));
  check_same_dtype(op, "z", z, "codebook", codebook);
  check_kernel_dtype(op, "z", z);
  check_same_device(op, "z", z, "codebook", codebook);
  check_device_type(op, "z", z, device_type);
  TORCH_CHECK(codebook.size(1) >= 1, op, ": codebook must hold at least one codeword (K >= 1), got K=0");
  TORCH_CHECK(codebook.size(1) <= std::numeric_limits<int32_t>::max(), op,
              ": codebook size K must be below 2**31, got K=", codebook.size(1));
}

}  // namespace kepler
