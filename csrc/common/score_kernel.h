// The register-blocked score micro-kernel of the CPU search ops (code_entropy; nearest_codeword is
// to move onto it): the tile ||e||^2 - 2 z.e of a few rows of z against blocks of packed codes,
// in float32 with fused multiply-adds, at GEMM speed.
//
// Layouts (all float32, filled by the pack/gather helpers below):
//   z block   [d][kRows]: one micro-block of rows, already multiplied by the caller's scale; the
//             rows past the last real one are zeros.
//   panels    [panel][d][16]: 16 codes per panel holding -2 e' (e' = e * scale; -2 is exact), so
//             the micro-kernel only multiplies and adds; a block of codes is padded with zero
//             codes to a multiple of kCodeAlign, which every kernel's tile width divides.
//   norms     [code]: ||e'||^2 of the panel codes, `pad_norm` for the padding codes.
// The kernel writes the scores of a rows x codes tile to an L1-sized buffer (row stride `ld`) and
// the caller's epilogue reads them there (an online reduction, an argmin): one kernel, any epilogue.
// A score is ||e'||^2 + (the sum of z'_d * (-2 e'_d) in a fixed order), so the same (row, code)
// pair gets the same bits whichever block, task or pass computes it (with the same kernel).
//
// Kernels (picked at run time, so the library still runs on older CPUs):
//   avx512    12 rows x 32 codes (two panels): 24 of the 32 zmm registers hold accumulators.
//   avx2       6 rows x 16 codes: 12 of the 16 ymm registers.
//   portable   4 rows x  8 codes in SSE-sized vectors (baseline x86-64 or any GCC target).
// KEPLER_DISABLE_AVX512=1 falls back to avx2 and KEPLER_DISABLE_AVX2=1 to portable (for tests);
// KEPLER_EMULATE_AVX512=1 runs the avx512 kernel's code (same tile, 16-float vectors) compiled for
// AVX2, so its logic is tested on machines without AVX-512.
//
// The kernel body is one template over a GCC vector type: a * b + c in a function compiled for an
// FMA target becomes a fused multiply-add (GCC contracts by default in C++).
#pragma once

#include "common/simd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kepler {
namespace score {

constexpr int64_t kPanelCodes = 16;
constexpr int64_t kCodeAlign = 32;  // code blocks are padded to this; every tile width divides it

typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));

template <typename V>
constexpr int64_t kLanes = sizeof(V) / sizeof(float);

template <typename V>
KEPLER_FORCE_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
KEPLER_FORCE_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
// x in every lane (not for hot loops: see Broadcast).
template <typename V>
KEPLER_FORCE_INLINE V splat(float x) {
  return V{} + x;
}

// Broadcasts of a float from memory into every lane, for the hot loops. GCC 12 merges the loads of
// neighbouring z values in the micro-kernel into one vector load and rebuilds each broadcast with
// shuffles (or through the stack), whatever the spelling in plain C++; an asm statement is opaque
// to that, so the AVX kernels broadcast with one vbroadcastss each (a load-port operation).
struct PlainBroadcast {
  template <typename V>
  static KEPLER_FORCE_INLINE V load(const float* p) {
    return V{} + *p;
  }
};
#if KEPLER_X86
struct AsmBroadcast {  // f32x8 in AVX2 code (a ymm register), f32x16 in AVX-512 code (a zmm one)
  template <typename V>
  static KEPLER_FORCE_INLINE V load(const float* p) {
    V v;
    if constexpr (sizeof(V) == 64) {
      asm("vbroadcastss %1, %0" : "=v"(v) : "m"(*p));
    } else {
      static_assert(sizeof(V) == 32, "AsmBroadcast is for 8 or 16 floats");
      asm("vbroadcastss %1, %0" : "=x"(v) : "m"(*p));
    }
    return v;
  }
};
#endif

// Scores kRows rows (z_block) against `codes` packed codes (a multiple of kNV * lanes) into
// out[r * ld + c]. Each step of d loads kNV code vectors and broadcasts kRows values of z, for
// kRows * kNV multiply-adds into accumulators that stay in registers. The dot product runs in
// chunks of kDimChunk, each from zero and then added to the tile in `out`, and the norm is added
// last (as ||e||^2 - 2 z.e is in the reference): an accumulator that starts at the norm, or one
// chain over all of d, rounds at the norm's magnitude D times and is several times less accurate
// than a blocked sgemm at D >= 100.
constexpr int64_t kDimChunk = 32;

template <typename V, typename Broadcast, int kRows, int kNV, int kDim>
KEPLER_FORCE_INLINE void score_block_body(const float* z_block, int64_t dim, const float* panels, const float* norms,
                                          int64_t codes, float* out, int64_t ld) {
  constexpr int64_t L = kLanes<V>;
  const int64_t D = kDim > 0 ? kDim : dim;
  for (int64_t c0 = 0; c0 < codes; c0 += kNV * L) {
    const float* column[kNV];
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j) {
      const int64_t c = c0 + j * L;
      column[j] = panels + (c / kPanelCodes) * D * kPanelCodes + c % kPanelCodes;
    }
    for (int64_t d0 = 0; d0 < D || d0 == 0; d0 += kDimChunk) {
      // A compile-time chunk length for the specialized D, so the d loop unrolls without a remainder.
      constexpr bool kStaticChunk = kDim > 0 && (kDim <= kDimChunk || kDim % kDimChunk == 0);
      const int64_t d1 = d0 + (kStaticChunk ? std::min<int64_t>(kDim, kDimChunk) : std::min(kDimChunk, D - d0));
      V acc[kRows][kNV];
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
        for (int j = 0; j < kNV; ++j) acc[r][j] = splat<V>(0.f);
      }
#pragma GCC unroll 8
      for (int64_t d = d0; d < d1; ++d) {
        V code[kNV];
#pragma GCC unroll 4
        for (int j = 0; j < kNV; ++j) code[j] = load<V>(column[j] + d * kPanelCodes);
#pragma GCC unroll 16
        for (int r = 0; r < kRows; ++r) {
          const V z_r = Broadcast::template load<V>(z_block + d * kRows + r);
#pragma GCC unroll 4
          for (int j = 0; j < kNV; ++j) acc[r][j] += z_r * code[j];
        }
      }
      const bool first = d0 == 0, last = d1 >= D;
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
        for (int j = 0; j < kNV; ++j) {
          float* tile = out + r * ld + c0 + j * L;
          V sum = first ? acc[r][j] : load<V>(tile) + acc[r][j];
          if (last) sum = load<V>(norms + c0 + j * L) + sum;
          store<V>(tile, sum);
        }
      }
    }
  }
}

using ScoreBlockFn = void (*)(const float* z_block, int64_t dim, const float* panels, const float* norms,
                              int64_t codes, float* out, int64_t ld);

// The instruction set a kernel was compiled for; the callers pick their epilogues to match.
enum class Isa { kPortable, kAvx2, kAvx512, kAvx512Emulated };

struct ScoreKernel {
  ScoreBlockFn score_block;
  int64_t rows;        // rows per micro-block (the z block height)
  int64_t tile_codes;  // codes per tile; divides kCodeAlign
  Isa isa;
};

constexpr int64_t kPortableRows = 4, kAvx2Rows = 6, kAvx512Rows = 12;

template <int kDim>
void score_block_portable(const float* z_block, int64_t dim, const float* panels, const float* norms, int64_t codes,
                          float* out, int64_t ld) {
  score_block_body<f32x4, PlainBroadcast, kPortableRows, 2, kDim>(z_block, dim, panels, norms, codes, out, ld);
}

#if KEPLER_X86
template <int kDim>
KEPLER_TARGET_AVX2 void score_block_avx2(const float* z_block, int64_t dim, const float* panels, const float* norms,
                                         int64_t codes, float* out, int64_t ld) {
  score_block_body<f32x8, AsmBroadcast, kAvx2Rows, 2, kDim>(z_block, dim, panels, norms, codes, out, ld);
}

template <int kDim>
KEPLER_TARGET_AVX512 void score_block_avx512(const float* z_block, int64_t dim, const float* panels,
                                             const float* norms, int64_t codes, float* out, int64_t ld) {
  score_block_body<f32x16, AsmBroadcast, kAvx512Rows, 2, kDim>(z_block, dim, panels, norms, codes, out, ld);
}

template <int kDim>
KEPLER_TARGET_AVX2 void score_block_avx512_emulated(const float* z_block, int64_t dim, const float* panels,
                                                    const float* norms, int64_t codes, float* out, int64_t ld) {
  score_block_body<f32x16, PlainBroadcast, kAvx512Rows, 2, kDim>(z_block, dim, panels, norms, codes, out, ld);
}

inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return has;
}
#endif  // KEPLER_X86

// Set and not "0". Read on every call, so tests can switch paths within one process.
inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// D = 8, 16, 32 and 64 get a specialization with the d loop unrolled.
#define KEPLER_SCORE_BY_DIM(fn, dim)                                                               \
  ((dim) == 8 ? &fn<8> : (dim) == 16 ? &fn<16> : (dim) == 32 ? &fn<32> : (dim) == 64 ? &fn<64> \
                                                                                       : &fn<0>)

inline ScoreKernel pick_score_kernel(int64_t dim) {
#if KEPLER_X86
  if (!env_flag("KEPLER_DISABLE_AVX2") && cpu_has_avx2_fma()) {
    if (!env_flag("KEPLER_DISABLE_AVX512") && cpu_has_avx512()) {
      return {KEPLER_SCORE_BY_DIM(score_block_avx512, dim), kAvx512Rows, 32, Isa::kAvx512};
    }
    if (env_flag("KEPLER_EMULATE_AVX512")) {
      return {KEPLER_SCORE_BY_DIM(score_block_avx512_emulated, dim), kAvx512Rows, 32, Isa::kAvx512Emulated};
    }
    return {KEPLER_SCORE_BY_DIM(score_block_avx2, dim), kAvx2Rows, 16, Isa::kAvx2};
  }
#endif
  return {KEPLER_SCORE_BY_DIM(score_block_portable, dim), kPortableRows, 8, Isa::kPortable};
}
#undef KEPLER_SCORE_BY_DIM

// Codes [0, count) (first code at `codes`, strides in elements), upcast and multiplied by `scale`,
// into panels holding -2 e' and their norms ||e'||^2 (float32); padded
// with zero codes of norm `pad_norm` up to a multiple of kCodeAlign.
template <typename scalar_t>
void pack_code_panels(const scalar_t* codes, int64_t stride_k, int64_t stride_d, int64_t count, int64_t dim,
                      float scale, float pad_norm, float* panels, float* norms) {
  const int64_t padded = (count + kCodeAlign - 1) / kCodeAlign * kCodeAlign;
  for (int64_t c = 0; c < padded; ++c) {
    float* dst = panels + (c / kPanelCodes) * dim * kPanelCodes + c % kPanelCodes;
    if (c < count) {
      const scalar_t* src = codes + c * stride_k;
      float partial[8] = {};  // eight interleaved sums: the error of a blocked sum, not of a chain
      for (int64_t d = 0; d < dim; ++d) {
        const float value = static_cast<float>(src[d * stride_d]) * scale;
        partial[d % 8] += value * value;
        dst[d * kPanelCodes] = -2.f * value;
      }
      norms[c] = ((partial[0] + partial[4]) + (partial[2] + partial[6])) +
                 ((partial[1] + partial[5]) + (partial[3] + partial[7]));
    } else {
      for (int64_t d = 0; d < dim; ++d) dst[d * kPanelCodes] = 0.f;
      norms[c] = pad_norm;
    }
  }
}

// Rows [0, count) (first row at `rows`, strides in elements), upcast and multiplied by `scale`,
// into one z block of `block_rows` rows; the rows past `count` are zeros.
template <typename scalar_t>
void gather_z_block(const scalar_t* rows, int64_t stride_n, int64_t stride_d, int64_t count, int64_t block_rows,
                    int64_t dim, float scale, float* block) {
  for (int64_t r = 0; r < block_rows; ++r) {
    if (r < count) {
      const scalar_t* src = rows + r * stride_n;
      for (int64_t d = 0; d < dim; ++d) block[d * block_rows + r] = static_cast<float>(src[d * stride_d]) * scale;
    } else {
      for (int64_t d = 0; d < dim; ++d) block[d * block_rows + r] = 0.f;
    }
  }
}

}  // namespace score
}  // namespace kepler

#pragma GCC diagnostic pop
