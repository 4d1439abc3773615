// Branch-free float math shared by the CPU kernels. Each function takes a float or a GCC vector of
// floats (the same code either way) and is forced inline, so that it vectorizes in its caller's
// loop and takes the caller's target and optimization options.
#pragma once

#include "common/simd.h"

// Vector arguments and results never cross a call (the functions are always inlined), so GCC's
// note that they would change the call ABI without AVX does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kepler {

// Cephes' expf core: exp(x - n ln2) by a degree-7 polynomial in r = x - n ln2 (ln2 split in two,
// so r is exact), about 2 ulp for |r| <= ln2 / 2. The caller picks the integer n nearest
// x log2(e) (as a float), clamps x and scales the result by 2^n.
template <typename T>
KEPLER_FORCE_INLINE T cephes_exp_reduced(T x, T n) {
  const T r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

}  // namespace kepler

#pragma GCC diagnostic pop
