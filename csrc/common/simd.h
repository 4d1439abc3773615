// Inlining and instruction-set attributes of the CPU kernels, spelled one way.
//
// The extension is compiled for the baseline x86-64 ISA, so faster code paths are asked for per
// function:
//   KEPLER_TARGET_CLONES  compiles a function twice (AVX2+FMA, i.e. x86-64-v3, and the baseline) and
//                         picks one when the library is loaded (GCC function multi-versioning,
//                         needs ifunc: GCC on x86-64 Linux; elsewhere one baseline version).
//   KEPLER_TARGET_AVX2    compiles a function for AVX2+FMA only; the caller must check the CPU at
//                         run time (KEPLER_X86 code only).
//   KEPLER_TARGET_AVX512  the same for AVX-512 (F, VL, BW, DQ) with AVX2+FMA: 32 vector registers of
//                         16 floats (x86-64-v4 without CD); the caller checks the CPU at run time.
//   KEPLER_FORCE_INLINE   always inline: helpers of the kernels above must be inlined into each
//                         version (a call would stay baseline code, and GCC does not inline across
//                         target or optimization-option mismatches on its own).
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define KEPLER_FORCE_INLINE inline __attribute__((always_inline))
#else
#define KEPLER_FORCE_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KEPLER_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KEPLER_TARGET_CLONES
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define KEPLER_X86 1
#define KEPLER_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define KEPLER_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define KEPLER_X86 0
#endif
