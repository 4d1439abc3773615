// Argument checks of kepler::code_entropy and kepler::code_entropy_backward, shared by their CPU and
// CUDA launchers.
#pragma once

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace kepler {
namespace code_entropy_detail {

// The forward's arguments, with `op` the op whose arguments they are (the backward takes them too).
inline void check_forward_arguments(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                                    const at::Tensor& scale, double inv_temperature, c10::DeviceType device_type) {
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
  TORCH_CHECK(scale.dim() == 0 && scale.scalar_type() == at::kFloat, op,
              ": scale must be a 0-d float32 tensor, got a ", scale.dim(), "-D ", scale.scalar_type(), " tensor");
  check_same_device(op, "z", z, "scale", scale);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0, op,
              ": inv_temperature must be finite and > 0, got ", inv_temperature);
}

// `name` is a float32 tensor of shape `sizes` on z's device.
inline void check_statistic(const char* op, const char* name, const char* shape, const at::Tensor& tensor,
                            at::IntArrayRef sizes, const at::Tensor& z) {
  TORCH_CHECK(tensor.sizes() == sizes && tensor.scalar_type() == at::kFloat && tensor.device() == z.device(), op,
              ": ", name, " must be float32 ", shape, " = ", sizes, " on z's device, got ", tensor.scalar_type(), " ",
              tensor.sizes(), " on ", tensor.device());
}

}  // namespace code_entropy_detail

// z (G, N, D) and codebook (Gc, K, D) with Gc in {1, G} and 1 <= K < 2**31, one kernel dtype, one
// device of `device_type`; scale a 0-d float32 tensor on that device; inv_temperature finite and > 0.
inline void check_code_entropy_inputs(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& scale,
                                      double inv_temperature, c10::DeviceType device_type) {
  code_entropy_detail::check_forward_arguments("kepler::code_entropy", z, codebook, scale, inv_temperature,
                                               device_type);
}

// The forward's arguments, then grad_per_sample and grad_batch (G,), row_stats (G, N, 3) and
// code_mass (G, K), all float32 on z's device.
inline void check_code_entropy_backward_inputs(const at::Tensor& grad_per_sample, const at::Tensor& grad_batch,
                                               const at::Tensor& z, const at::Tensor& codebook,
                                               const at::Tensor& scale, double inv_temperature,
                                               const at::Tensor& row_stats, const at::Tensor& code_mass,
                                               c10::DeviceType device_type) {
  constexpr const char* op = "kepler::code_entropy_backward";
  code_entropy_detail::check_forward_arguments(op, z, codebook, scale, inv_temperature, device_type);
  const int64_t G = z.size(0), N = z.size(1), K = codebook.size(1);
  code_entropy_detail::check_statistic(op, "grad_per_sample", "(G,)", grad_per_sample, {G}, z);
  code_entropy_detail::check_statistic(op, "grad_batch", "(G,)", grad_batch, {G}, z);
  code_entropy_detail::check_statistic(op, "row_stats", "(G, N, 3)", row_stats, {G, N, 3}, z);
  code_entropy_detail::check_statistic(op, "code_mass", "(G, K)", code_mass, {G, K}, z);
}

}  // namespace kepler
