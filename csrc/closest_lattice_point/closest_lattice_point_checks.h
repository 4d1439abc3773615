// Argument checks of kepler::closest_lattice_point, shared by its CPU and CUDA launchers, and the
// lattice families the kernels take (kepler/reference/closest_lattice_point.py's LATTICE_FAMILIES).
#pragma once

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <string>

namespace kepler {

enum class LatticeFamily {
  kZ,   // Z^n, any n
  kD,   // D_n (integer vectors with an even sum), any n
  kA2,  // the hexagonal lattice, n = 2
  kE8,  // D8 u (D8 + (1/2)^8), n = 8
};

// The family named `lattice` ("Z", "D", "A2", "E8"); x (N, n) with n >= 1, n = 2 for A2 and 8 for
// E8, a kernel dtype, on a device of `device_type`.
inline LatticeFamily check_closest_lattice_point_inputs(const at::Tensor& x, const std::string& lattice,
                                                         c10::DeviceType device_type) {
  constexpr const char* op = "kepler::closest_lattice_point";
  check_dims(op, "x", x, {"N", "n"});
  check_kernel_dtype(op, "x", x);
  check_device_type(op, "x", x, device_type);
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have rows of at least one coordinate (n >= 1), got x of shape ",
              x.sizes());
  LatticeFamily family;
  int64_t fixed_dim = 0;  // the row length of a fixed-dimension family, 0 for any
  if (lattice == "Z") {
    family = LatticeFamily::kZ;
  } else if (lattice == "D") {
    family = LatticeFamily::kD;
  } else if (lattice == "A2") {
    family = LatticeFamily::kA2;
    fixed_dim = 2;
  } else if (lattice == "E8") {
    family = LatticeFamily::kE8;
    fixed_dim = 8;
  } else {
    TORCH_CHECK(false, op, ": lattice must be one of Z, D, A2, E8, got '", lattice, "'");
  }
  TORCH_CHECK(fixed_dim == 0 || x.size(1) == fixed_dim, op, ": ", lattice, " takes rows of ", fixed_dim,
              ", got x of shape ", x.sizes());
  return family;
}

}  // namespace kepler
