// Argument checks that the launchers of every op share. Each message starts with the op's
// registered name ("kepler::<op>", as torch.ops.kepler.<op> is called) and names the argument.
// The checks of one op's arguments live beside it, in csrc/<op>/<op>_checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

namespace kepler {

// "(G, N, D)" for the dimension names {"G", "N", "D"}.
inline std::string shape_names(std::initializer_list<const char*> dims) {
  std::string joined = "(";
  for (const char* dim : dims) joined += (joined.size() > 1 ? ", " : "") + std::string(dim);
  return joined + ")";
}

// `name` has one dimension per entry of `dims`, e.g. check_dims(op, "z", z, {"G", "N", "D"}).
inline void check_dims(const char* op, const char* name, const at::Tensor& tensor,
                       std::initializer_list<const char*> dims) {
  const auto expected = static_cast<int64_t>(dims.size());
  TORCH_CHECK(tensor.dim() == expected, op, ": ", name, " must be ", expected, "-D ", shape_names(dims), ", got a ",
              tensor.dim(), "-D tensor of shape ", tensor.sizes());
}

// The dtypes every kernel takes (KERNEL_DTYPES in kernels/_common.py; KEPLER_DISPATCH_KERNEL_DTYPES).
inline bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

inline void check_kernel_dtype(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(is_kernel_dtype(tensor.scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16, got ",
              tensor.scalar_type());
}

// The kernel dtypes and float64 (KEPLER_DISPATCH_KERNEL_DTYPES_AND_DOUBLE).
inline void check_kernel_dtype_or_double(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(is_kernel_dtype(tensor.scalar_type()) || tensor.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", tensor.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                             const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                              const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

// `name` is on a device of the launcher's type (the dispatcher picks the kernel by device, so this
// fails only for a launcher called some other way).
inline void check_device_type(const char* op, const char* name, const at::Tensor& tensor,
                              c10::DeviceType device_type) {
  TORCH_CHECK(tensor.device().type() == device_type, op, ": ", name, " must be a ", c10::DeviceTypeName(device_type),
              " tensor, got ", tensor.device());
}

// The arguments of an op that scores rows against codewords (nearest_codeword, code_entropy): z
// (G, N, D) and codebook (Gc, K, D) with Gc in {1, G}, K >= 1, one kernel dtype, one device of
// `device_type`. Code indices are int32 inside the kernels, hence K < 2**31.
inline void check_search_inputs(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                                c10::DeviceType device_type) {
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
