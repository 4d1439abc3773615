// Argument checks of kepler::kepler_kl and kepler::kepler_kl_backward, shared by their CPU and CUDA
// launchers.
#pragma once

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>

namespace kepler {

// x (B, M) of a kernel dtype with M >= 1, prior_logq (1, M) or (B, M) float32, both on one device
// of `device_type`, eps >= 0. `op` is the op whose arguments these are (the backward takes them too).
inline void check_kepler_kl_inputs(const at::Tensor& x, const at::Tensor& prior_logq, double eps,
                                   c10::DeviceType device_type, const char* op = "kepler::kepler_kl") {
  check_dims(op, "x", x, {"B", "M"});
  check_kernel_dtype(op, "x", x);
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one column");
  TORCH_CHECK(prior_logq.dim() == 2 && prior_logq.size(1) == x.size(1) &&
                  (prior_logq.size(0) == 1 || prior_logq.size(0) == x.size(0)),
              op, ": prior_logq must be (1, M) or (B, M) for x of shape ", x.sizes(), ", got ", prior_logq.sizes());
  TORCH_CHECK(prior_logq.scalar_type() == at::kFloat, op, ": prior_logq must be float32, got ",
              prior_logq.scalar_type());
  check_same_device(op, "x", x, "prior_logq", prior_logq);
  check_device_type(op, "x", x, device_type);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

// The forward's arguments, then grad_loss (B,) and the forward's stats (B, 3) float32, on x's device.
inline void check_kepler_kl_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& x,
                                            const at::Tensor& prior_logq, const at::Tensor& stats, double eps,
                                            c10::DeviceType device_type) {
  constexpr const char* op = "kepler::kepler_kl_backward";
  check_kepler_kl_inputs(x, prior_logq, eps, device_type, op);
  const int64_t num_rows = x.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == num_rows && grad_loss.device() == x.device(), op,
              ": grad_loss must be (B,) = (", num_rows, ",) on x's device, got ", grad_loss.sizes(), " on ",
              grad_loss.device());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == num_rows && stats.size(1) == 3 &&
                  stats.scalar_type() == at::kFloat && stats.device() == x.device(),
              op, ": stats must be float32 (B, 3) on x's device, got ", stats.scalar_type(), " ", stats.sizes(), " on ",
              stats.device());
}

}  // namespace kepler
