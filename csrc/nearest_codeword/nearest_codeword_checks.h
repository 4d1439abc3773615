// Argument checks of kepler::nearest_codeword, shared by its CPU and CUDA launchers.
#pragma once

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

namespace kepler {

// The search checks (csrc/common/checks.h) under this op's name.
inline void check_nearest_codeword_inputs(const at::Tensor& z, const at::Tensor& codebook,
                                          c10::DeviceType device_type) {
  check_search_inputs("kepler::nearest_codeword", z, codebook, device_type);
}

}  // namespace kepler
