// Schemas of every kepler op, in one place. Kernels register their implementations with
// TORCH_LIBRARY_IMPL(kepler, CPU|CUDA, m) in csrc/<op>/<op>_{cpu.cpp,cuda.cu}; the Python side
// (kepler/ops/) adds fake implementations and autograd.
//
// Every op's C++ side has the same three files; to add one, copy those of packing_energy (a
// forward and a backward, float64 taken) or nearest_codeword (forward only) and rename:
//   csrc/<op>/<op>_checks.h   check_<op>_inputs(...) (and check_<op>_backward_inputs(...)): the
//                             argument checks both launchers call, built on csrc/common/checks.h
//   csrc/<op>/<op>_cpu.cpp    includes; anonymous-namespace kernel code; the launchers <op>_cpu
//                             (and <op>_backward_cpu): checks, allocation, dispatch with
//                             KEPLER_DISPATCH_KERNEL_DTYPES(_AND_DOUBLE) (csrc/common/dispatch.h);
//                             TORCH_LIBRARY_IMPL(kepler, CPU, m) at the end
//   csrc/<op>/<op>_cuda.cu    the same for CUDA (<op>_cuda, a CUDAGuard before allocating)
// then add the schema below. csrc/common/simd.h spells the CPU target and inlining attributes.
// setup.py compiles every csrc/**/*.cpp (and *.cu in a CUDA build), so it needs no change.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(kepler, m) {
  // z: (G, N, D), codebook: (Gc, K, D) with Gc in {1, G}; float32/bfloat16/float16, same dtype.
  // Returns indices (G, N) int64 and sq_dist (G, N) float32 = ||z - codebook[idx]||^2
  // recomputed exactly for the winner. Ties go to the lowest index.
  m.def("nearest_codeword(Tensor z, Tensor codebook) -> (Tensor indices, Tensor sq_dist)");

  // x: (B, M) float, prior_logq: (Bp, M) float32 with Bp in {1, B} (log-softmax of the
  // standardized prior). Returns loss (B,) float32 and stats (B, 3) float32 = (max, scale,
  // logsumexp of u = (x - max) / scale, the standardized row less its max) for the backward.
  m.def("kepler_kl(Tensor x, Tensor prior_logq, bool use_std, float eps) -> (Tensor loss, Tensor stats)");
  m.def(
      "kepler_kl_backward(Tensor grad_loss, Tensor x, Tensor prior_logq, Tensor stats, bool use_std, "
      "float eps) -> Tensor");

  // y: (G, K, d) float (already centred/scaled by the caller). Returns energy (G,) float32 and
  // row_lse (G, K) float32 = log sum_{j != i} exp(-t ||y_i - y_j||^2) for the backward.
  m.def("packing_energy(Tensor y, float t) -> (Tensor energy, Tensor row_lse)");
  m.def(
      "packing_energy_backward(Tensor grad_energy, Tensor y, float t, Tensor energy, Tensor row_lse) "
      "-> Tensor");

  // x: (N, n) float, lattice one of "Z" (Z^n), "D" (D_n), "A2" (n = 2), "E8" (n = 8). Returns the
  // closest lattice point of every row, (N, n) float32; a row holding NaN/inf gives NaN. No backward.
  m.def("closest_lattice_point(Tensor x, str lattice) -> Tensor");

  // z: (G, N, D), codebook: (Gc, K, D) with Gc in {1, G}; float32/bfloat16/float16, same dtype.
  // scale: 0-d float32 power of two the inputs are multiplied by as they are read (the search
  // scale of nearest_codeword); inv_temperature = 1 / T. Scores c = ||e'||^2 - 2 z'.e' (' =
  // scaled), logits -(c - c_min) * alpha with alpha = inv_temperature / scale^2 capped at FLT_MAX.
  // Returns row_stats (G, N, 3) float32 = (c_min, log l, entropy) per row and code_mass (G, K)
  // float32 = sum_n p[n, k] (kepler/reference/code_entropy.py is the spec).
  m.def(
      "code_entropy(Tensor z, Tensor codebook, Tensor scale, float inv_temperature) -> (Tensor row_stats, "
      "Tensor code_mass)");
  // grad_per_sample, grad_batch: (G,) float32. Returns grad_z (G, N, D) and grad_codebook
  // (Gc, K, D), contiguous, in the inputs' dtype (summed over the groups for a shared codebook).
  m.def(
      "code_entropy_backward(Tensor grad_per_sample, Tensor grad_batch, Tensor z, Tensor codebook, Tensor scale, "
      "float inv_temperature, Tensor row_stats, Tensor code_mass) -> (Tensor grad_z, Tensor grad_codebook)");
}

namespace kepler {
bool cuda_built() {
#ifdef KEPLER_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace kepler

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kepler C++/CUDA kernels; the ops live under torch.ops.kepler";
  m.def("cuda_built", &kepler::cuda_built, "True when the CUDA kernels were compiled in");
}
