// Argument checks of kepler::code_entropy and kepler::code_entropy_backward, shared by their CPU
// and CUDA launchers.
#pragma once

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace kepler {

// The search checks (csrc/common/checks.h: z (G, N, D), codebook (Gc, K, D) with Gc in {1, G},
// K >= 1, one kernel dtype and device); scale a 0-d float32 power of two on that device (the
// search scale the inputs are multiplied by); inv_temperature finite and > 0. `op` is the op whose
// arguments these are (the backward takes them too).
inline void check_code_entropy_inputs(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& scale,
                                      double inv_temperature, c10::DeviceType device_type,
                                      const char* op = "kepler::code_entropy") {
  check_search_inputs(op, z, codebook, device_type);
  TORCH_CHECK(scale.dim() == 0 && scale.scalar_type() == at::kFloat, op,
              ": scale must be a 0-D float32 tensor, got a ", scale.dim(), "-D ", scale.scalar_type(), " tensor");
  check_same_device(op, "z", z, "scale", scale);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0, op,
              ": inv_temperature must be finite and > 0, got ", inv_temperature);
}

// A scale read on the host: a finite power of two (so multiplying by it is exact).
inline void check_code_entropy_scale_value(float scale, const char* op) {
  int exponent = 0;
  TORCH_CHECK(std::isfinite(scale) && scale > 0 && std::frexp(scale, &exponent) == 0.5f, op,
              ": scale must be a finite power of two, got ", scale);
}

// The forward's arguments, then grad_per_sample and grad_batch (G,) float32, row_stats (G, N, 3)
// and code_mass (G, K) float32 (the forward's outputs).
inline void check_code_entropy_backward_inputs(const at::Tensor& grad_per_sample, const at::Tensor& grad_batch,
                                               const at::Tensor& z, const at::Tensor& codebook,
                                               const at::Tensor& scale, double inv_temperature,
                                               const at::Tensor& row_stats, const at::Tensor& code_mass,
                                               c10::DeviceType device_type) {
  constexpr const char* op = "kepler::code_entropy_backward";
  check_code_entropy_inputs(z, codebook, scale, inv_temperature, device_type, op);
  const int64_t G = z.size(0), N = z.size(1), K = codebook.size(1);
  const std::pair<const char*, const at::Tensor*> stats[] = {
      {"grad_per_sample", &grad_per_sample}, {"grad_batch", &grad_batch}, {"row_stats", &row_stats},
      {"code_mass", &code_mass}};
  for (const auto& [name, tensor] : stats) {
    TORCH_CHECK(tensor->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                tensor->scalar_type());
    check_same_device(op, "z", z, name, *tensor);
  }
  TORCH_CHECK(grad_per_sample.sizes() == at::IntArrayRef{G} && grad_batch.sizes() == at::IntArrayRef{G}, op,
              ": grad_per_sample and grad_batch must be (G,) = (", G, ",), got ", grad_per_sample.sizes(), " and ",
              grad_batch.sizes());
  TORCH_CHECK(row_stats.sizes() == at::IntArrayRef({G, N, 3}), op, ": row_stats must be (G, N, 3) = (", G, ", ",
              N, ", 3), got ", row_stats.sizes());
  TORCH_CHECK(code_mass.sizes() == at::IntArrayRef({G, K}), op, ": code_mass must be (G, K) = (", G, ", ", K,
              "), got ", code_mass.sizes());
}

}  // namespace kepler
