// Argument checks shared by the CPU and CUDA launchers of kepler_kl / kepler_kl_backward.
#pragma once

#include <torch/types.h>

namespace kepler {

inline void kepler_kl_check_inputs(const char* op, const at::Tensor& x, const at::Tensor& prior_logq, double eps,
                                   c10::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (B, M), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one column");
  TORCH_CHECK(prior_logq.dim() == 2 && prior_logq.size(1) == x.size(1) &&
                  (prior_logq.size(0) == 1 || prior_logq.size(0) == x.size(0)),
              op, ": prior_logq must be (1, M) or (B, M) for x of shape ", x.sizes(), ", got ", prior_logq.sizes());
  TORCH_CHECK(prior_logq.scalar_type() == at::kFloat, op, ": prior_logq must be float32, got ",
              prior_logq.scalar_type());
  TORCH_CHECK(x.device().type() == device_type && prior_logq.device() == x.device(), op,
              ": x and prior_logq must be on the same ", c10::DeviceTypeName(device_type), " device, got ",
              x.device(), " and ", prior_logq.device());
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

inline void kepler_kl_check_backward(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& x) {
  const int64_t num_rows = x.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == num_rows && grad_loss.device() == x.device(),
              "kepler_kl_backward: grad_loss must be (B,) = (", num_rows, ",) on x's device, got ", grad_loss.sizes(),
              " on ", grad_loss.device());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == num_rows && stats.size(1) == 3 &&
                  stats.scalar_type() == at::kFloat && stats.device() == x.device(),
              "kepler_kl_backward: stats must be float32 (B, 3) on x's device, got ", stats.scalar_type(), " ",
              stats.sizes(), " on ", stats.device());
}

// The input dtypes the kernels take (fp32 math inside): float32, bfloat16, float16.
#define KEPLER_KL_DISPATCH_CASES(...)          \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

}  // namespace kepler
