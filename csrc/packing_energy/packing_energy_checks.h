// Argument checks of kepler::packing_energy and kepler::packing_energy_backward, shared by their CPU
// and CUDA launchers.
#pragma once

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cmath>
#include <cstdint>

namespace kepler {

// y (G, K, d) of a kernel dtype or float64 on a device of `device_type`, K >= 2, d >= 1, t finite
// and > 0. `op` is the op whose arguments these are (the backward takes them too).
inline void check_packing_energy_inputs(const at::Tensor& y, double t, c10::DeviceType device_type,
                                        const char* op = "kepler::packing_energy") {
  check_dims(op, "y", y, {"G", "K", "d"});
  check_kernel_dtype_or_double(op, "y", y);
  check_device_type(op, "y", y, device_type);
  TORCH_CHECK(y.size(1) >= 2, op, ": needs K >= 2 codewords, got K=", y.size(1));
  TORCH_CHECK(y.size(2) >= 1, op, ": needs d >= 1, got d=", y.size(2));
  TORCH_CHECK(t > 0 && std::isfinite(t), op, ": t must be finite and > 0, got ", t);
}

// The forward's arguments, then grad_energy and energy (G,) and row_lse (G, K).
inline void check_packing_energy_backward_inputs(const at::Tensor& grad_energy, const at::Tensor& y, double t,
                                                 const at::Tensor& energy, const at::Tensor& row_lse,
                                                 c10::DeviceType device_type) {
  constexpr const char* op = "kepler::packing_energy_backward";
  check_packing_energy_inputs(y, t, device_type, op);
  const int64_t G = y.size(0), K = y.size(1);
  TORCH_CHECK(grad_energy.sizes() == at::IntArrayRef{G} && energy.sizes() == at::IntArrayRef{G}, op,
              ": grad_energy and energy must be (G,) = (", G, ",), got ", grad_energy.sizes(), " and ", energy.sizes());
  TORCH_CHECK(row_lse.sizes() == at::IntArrayRef({G, K}), op, ": row_lse must be (G, K) = (", G, ", ", K, "), got ",
              row_lse.sizes());
}

}  // namespace kepler
