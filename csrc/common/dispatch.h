// The dtypes the kernels take, the type they accumulate in, and the dispatch over them.
//
// Mirrors KERNEL_DTYPES in kernels/_common.py (float32, bfloat16, float16): what every kernel
// takes; packing_energy also takes float64 (for gradcheck-grade testing, not speed).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

namespace kepler {

// Accumulation type of a kernel dtype: float64 for float64, float32 for the rest (bfloat16 and
// float16 are upcast in registers). accumulate_type is the run-time twin of accumulate_t.
template <typename scalar_t>
using accumulate_t = at::opmath_type<scalar_t>;

inline at::ScalarType accumulate_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace kepler

#define KEPLER_DISPATCH_CASE_KERNEL_DTYPES(...)  \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)

// KEPLER_DISPATCH_KERNEL_DTYPES(dtype, "name", [&] { ... scalar_t ... }): float32, bfloat16, float16.
#define KEPLER_DISPATCH_KERNEL_DTYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, KEPLER_DISPATCH_CASE_KERNEL_DTYPES(__VA_ARGS__))

// The same plus float64.
#define KEPLER_DISPATCH_KERNEL_DTYPES_AND_DOUBLE(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, KEPLER_DISPATCH_CASE_KERNEL_DTYPES(__VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))
