// CPU kernel of kepler::nearest_codeword(z (G, N, D), codebook (Gc, K, D)) -> (indices, sq_dist).
//
// A fused, blocked search that never materializes an N x K distance matrix (the way BLAS-based
// searches do tile by tile). Rows of z are split into tasks of up to kMaxRowsPerTask rows of one
// group, claimed one at a time by the at::parallel_for workers. A task upcasts its rows to
// float32 into a thread-local buffer, then walks the codebook in blocks sized to stay in the L2
// cache: each block is upcast, scaled by -2 (exact) and packed into panels of 16 codes (once per
// call for a shared codebook that fits in one block, else per task), and a
// register-blocked micro-kernel computes the search score ||e||^2 - 2 z.e with float32
// accumulation (starting from the precomputed ||e||^2) and merges it into a per-row, per-lane
// running (score, panel) with a strict `<`. The lane winners are reduced with the lowest-index
// tie-break, and the winner's distance is recomputed exactly as sum_d (z_d - e_d)^2 in float32.
//
// Inputs are read through their strides (no .contiguous() copy) and bfloat16/float16 are upcast
// only into the task's buffers, so the extra memory is a few hundred KiB per thread.
//
// Non-finite scores never win. NaN and +inf lose every `<` by themselves; -inf would win it, and
// excluding it costs two more vector operations per score, so the hot pass does not: a row whose
// winner is -inf (an overflowing z . e) is scanned again by the same kernel with the exclusion on.
//
// x86-64 machines with AVX2 + FMA run the intrinsics micro-kernels (compiled for that target
// only and picked at run time, so the library still runs on older CPUs); others run a portable
// one. KEPLER_DISABLE_AVX2=1 forces the portable one (for tests).
#include "nearest_codeword/nearest_codeword_checks.h"
#include "common/dispatch.h"
#include "common/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ceil_div.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if KEPLER_X86
#include <immintrin.h>
#endif

namespace kepler {
namespace {

constexpr int64_t kCodesPerPanel = 16;       // codes per packed panel (two 8-float vectors)
constexpr int64_t kMaxRowsPerTask = 1024;     // z rows that share one packing of each code block
constexpr int64_t kMaxRowsPerTaskPrepacked = 256;  // when the whole codebook is packed once per call
constexpr int64_t kCodeBlockFloats = 1 << 16;  // 256 KiB of packed codes: stays in L2

constexpr float kInf = std::numeric_limits<float>::infinity();

// Running winner of one z row, one slot per panel lane: lane j has seen the codes
// k = 16 * panel + j and keeps the lowest score and the panel it came from.
struct alignas(64) LaneBest {
  float score[kCodesPerPanel];
  int32_t panel[kCodesPerPanel];
};

void reset(LaneBest* best, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    std::fill(best[i].score, best[i].score + kCodesPerPanel, kInf);
    // Lanes that never win keep +inf and panel 0; reduce_lanes then gives a row without any
    // finite score index 0.
    std::fill(best[i].panel, best[i].panel + kCodesPerPanel, 0);
  }
}

// Scores one micro-block of z rows (layout [d][row], float32, `rows` = the kernel's micro-block
// height) against `num_panels` packed panels (layout [panel][d][lane], holding -2 * e, with the
// norms in `panel_norms`) numbered from `first_panel`, and merges the scores into best[0..rows).
// The score of a lane starts from ||e||^2 and accumulates z_d * (-2 e_d) over d in order.
using ScanPanelsFn = void (*)(const float* z_block, int64_t dim, const float* panels, const float* panel_norms,
                              int64_t num_panels, int32_t first_panel, LaneBest* best);

struct ScanKernel {
  ScanPanelsFn scan;
  int64_t rows_per_micro_block;
};

constexpr int64_t kPortableRows = 4;

template <bool kExcludeNegInf>
void scan_panels_portable(const float* z_block, int64_t dim, const float* panels, const float* panel_norms,
                          int64_t num_panels, int32_t first_panel, LaneBest* best) {
  for (int64_t p = 0; p < num_panels; ++p) {
    const float* panel = panels + p * dim * kCodesPerPanel;
    const float* norms = panel_norms + p * kCodesPerPanel;
    float acc[kPortableRows][kCodesPerPanel];
    for (int64_t r = 0; r < kPortableRows; ++r) {
      for (int64_t j = 0; j < kCodesPerPanel; ++j) acc[r][j] = norms[j];
    }
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t r = 0; r < kPortableRows; ++r) {
        const float zd = z_block[d * kPortableRows + r];
        for (int64_t j = 0; j < kCodesPerPanel; ++j) acc[r][j] += zd * panel[d * kCodesPerPanel + j];
      }
    }
    for (int64_t r = 0; r < kPortableRows; ++r) {
      for (int64_t j = 0; j < kCodesPerPanel; ++j) {
        const float score = acc[r][j];
        if (score < best[r].score[j] && (!kExcludeNegInf || score > -kInf)) {  // false for NaN
          best[r].score[j] = score;
          best[r].panel[j] = first_panel + static_cast<int32_t>(p);
        }
      }
    }
  }
}

#if KEPLER_X86
// mask ? b : a. Inline assembly because GCC 12 turns the intrinsic into an extra integer
// compare per call when the mask comes from a float compare.
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE __m256 select(__m256 a, __m256 b, __m256 mask) {
  __m256 result;
  asm("vblendvps %3, %2, %1, %0" : "=x"(result) : "x"(a), "x"(b), "x"(mask));
  return result;
}

// Merges one vector of scores into a lane winner (score, panel). min() keeps the old score on
// ties and for NaN, exactly like the strict `<` that picks the panel. With kExcludeNegInf, -inf
// scores are first turned into +inf, which never wins.
template <bool kExcludeNegInf>
KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE void merge(__m256 score, __m256 panel, __m256& best_score, __m256& best_panel) {
  if (kExcludeNegInf) {
    score = select(score, _mm256_set1_ps(kInf), _mm256_cmp_ps(score, _mm256_set1_ps(-kInf), _CMP_EQ_OQ));
  }
  const __m256 wins = _mm256_cmp_ps(score, best_score, _CMP_LT_OQ);
  best_score = _mm256_min_ps(score, best_score);
  best_panel = select(best_panel, panel, wins);
}

KEPLER_TARGET_AVX2 KEPLER_FORCE_INLINE __m256 next_panel(__m256 panel) {
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(panel), _mm256_set1_epi32(1)));
}

// Large D: 6 rows x 16 codes, 12 accumulators; the lane winners live in memory (L1) and are
// merged once per panel, which is cheap next to the 12 * D multiply-adds.
constexpr int64_t kWideRows = 6;

template <int kDim, bool kExcludeNegInf>
KEPLER_TARGET_AVX2 void scan_panels_avx2_6x16(const float* z_block, int64_t dim, const float* panels,
                                              const float* panel_norms, int64_t num_panels, int32_t first_panel,
                                              LaneBest* best) {
  const int64_t D = kDim > 0 ? kDim : dim;
  __m256 panel_id = _mm256_castsi256_ps(_mm256_set1_epi32(first_panel));
  for (int64_t p = 0; p < num_panels; ++p) {
    const float* panel = panels + p * D * kCodesPerPanel;
    const __m256 norm_lo = _mm256_load_ps(panel_norms + p * kCodesPerPanel);
    const __m256 norm_hi = _mm256_load_ps(panel_norms + p * kCodesPerPanel + 8);
    __m256 acc_lo[kWideRows];
    __m256 acc_hi[kWideRows];
#pragma GCC unroll 6
    for (int r = 0; r < kWideRows; ++r) {
      acc_lo[r] = norm_lo;
      acc_hi[r] = norm_hi;
    }
#pragma GCC unroll 8
    for (int64_t d = 0; d < D; ++d) {
      const __m256 code_lo = _mm256_load_ps(panel + d * kCodesPerPanel);
      const __m256 code_hi = _mm256_load_ps(panel + d * kCodesPerPanel + 8);
#pragma GCC unroll 6
      for (int r = 0; r < kWideRows; ++r) {
        const __m256 z_r = _mm256_broadcast_ss(z_block + d * kWideRows + r);
        acc_lo[r] = _mm256_fmadd_ps(z_r, code_lo, acc_lo[r]);
        acc_hi[r] = _mm256_fmadd_ps(z_r, code_hi, acc_hi[r]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < kWideRows; ++r) {
      float* score = best[r].score;
      float* panel_of = reinterpret_cast<float*>(best[r].panel);  // int32 bits, moved as floats
      for (int half = 0; half < 2; ++half) {
        __m256 best_score = _mm256_load_ps(score + 8 * half);
        __m256 best_panel = _mm256_load_ps(panel_of + 8 * half);
        merge<kExcludeNegInf>(half == 0 ? acc_lo[r] : acc_hi[r], panel_id, best_score, best_panel);
        _mm256_store_ps(score + 8 * half, best_score);
        _mm256_store_ps(panel_of + 8 * half, best_panel);
      }
    }
    panel_id = next_panel(panel_id);
  }
}

// Small D: 4 rows x 8 codes with the lane winners in registers for the whole code block (12 of
// the 16 vector registers), so the merge costs no memory traffic. Each half of the 16-code
// panels is swept in turn.
constexpr int64_t kNarrowRows = 4;

template <int kDim, bool kExcludeNegInf>
KEPLER_TARGET_AVX2 void scan_panels_avx2_4x8(const float* z_block, int64_t dim, const float* panels,
                                             const float* panel_norms, int64_t num_panels, int32_t first_panel,
                                             LaneBest* best) {
  const int64_t D = kDim > 0 ? kDim : dim;
  for (int half = 0; half < 2; ++half) {
    __m256 best_score[kNarrowRows];
    __m256 best_panel[kNarrowRows];
#pragma GCC unroll 4
    for (int r = 0; r < kNarrowRows; ++r) {
      best_score[r] = _mm256_load_ps(best[r].score + 8 * half);
      best_panel[r] = _mm256_load_ps(reinterpret_cast<const float*>(best[r].panel) + 8 * half);
    }
    __m256 panel_id = _mm256_castsi256_ps(_mm256_set1_epi32(first_panel));
    for (int64_t p = 0; p < num_panels; ++p) {
      const float* panel = panels + p * D * kCodesPerPanel + 8 * half;
      const __m256 norm = _mm256_load_ps(panel_norms + p * kCodesPerPanel + 8 * half);
      __m256 acc[kNarrowRows];
#pragma GCC unroll 4
      for (int r = 0; r < kNarrowRows; ++r) acc[r] = norm;
#pragma GCC unroll 16
      for (int64_t d = 0; d < D; ++d) {
        const __m256 code = _mm256_load_ps(panel + d * kCodesPerPanel);
#pragma GCC unroll 4
        for (int r = 0; r < kNarrowRows; ++r) {
          acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(z_block + d * kNarrowRows + r), code, acc[r]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kNarrowRows; ++r) merge<kExcludeNegInf>(acc[r], panel_id, best_score[r], best_panel[r]);
      panel_id = next_panel(panel_id);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kNarrowRows; ++r) {
      _mm256_store_ps(best[r].score + 8 * half, best_score[r]);
      _mm256_store_ps(reinterpret_cast<float*>(best[r].panel) + 8 * half, best_panel[r]);
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif  // KEPLER_X86

bool avx2_disabled_by_env() {
  const char* value = std::getenv("KEPLER_DISABLE_AVX2");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// The micro-kernel for this machine and D (measured on a Zen 3 core: the 4 x 8 kernel is ~1.6x
// faster up to D = 16, the 6 x 16 one ~1.6x faster from D = 32); D = 8, 16, 32 and 64 get a
// specialization with the D loop unrolled.
template <bool kExcludeNegInf>
ScanKernel pick_scan_kernel(int64_t dim) {
#if KEPLER_X86
  if (cpu_has_avx2_fma() && !avx2_disabled_by_env()) {
    switch (dim) {
      case 8: return {&scan_panels_avx2_4x8<8, kExcludeNegInf>, kNarrowRows};
      case 16: return {&scan_panels_avx2_4x8<16, kExcludeNegInf>, kNarrowRows};
      case 32: return {&scan_panels_avx2_6x16<32, kExcludeNegInf>, kWideRows};
      case 64: return {&scan_panels_avx2_6x16<64, kExcludeNegInf>, kWideRows};
      default:
        return dim < 24 ? ScanKernel{&scan_panels_avx2_4x8<0, kExcludeNegInf>, kNarrowRows}
                        : ScanKernel{&scan_panels_avx2_6x16<0, kExcludeNegInf>, kWideRows};
    }
  }
#endif
  return {&scan_panels_portable<kExcludeNegInf>, kPortableRows};
}

// Thread-local float32 buffers of one worker. at::empty gives 64-byte aligned storage.
struct TaskBuffers {
  at::Tensor z_blocks_storage, panels_storage, panel_norms_storage;
  std::vector<LaneBest> best;
  float* z_blocks;
  float* panels;
  float* panel_norms;

  TaskBuffers(int64_t max_rows, int64_t codes_per_block, int64_t dim)
      : z_blocks_storage(at::empty({std::max<int64_t>(max_rows * dim, 1)}, at::kFloat)),
        panels_storage(at::empty({std::max<int64_t>(codes_per_block * dim, 1)}, at::kFloat)),
        panel_norms_storage(at::empty({codes_per_block}, at::kFloat)),
        best(max_rows),
        z_blocks(z_blocks_storage.data_ptr<float>()),
        panels(panels_storage.data_ptr<float>()),
        panel_norms(panel_norms_storage.data_ptr<float>()) {}
};

template <typename scalar_t>
class NearestCodewordCpu {
 public:
  NearestCodewordCpu(const at::Tensor& z, const at::Tensor& codebook, at::Tensor& indices, at::Tensor& sq_dist)
      : groups_(z.size(0)),
        rows_(z.size(1)),
        dim_(z.size(2)),
        codebook_groups_(codebook.size(0)),
        codes_(codebook.size(1)),
        z_(z.data_ptr<scalar_t>()),
        z_stride_g_(z.stride(0)),
        z_stride_n_(z.stride(1)),
        z_stride_d_(z.stride(2)),
        codebook_(codebook.data_ptr<scalar_t>()),
        codebook_stride_g_(codebook.stride(0)),
        codebook_stride_k_(codebook.stride(1)),
        codebook_stride_d_(codebook.stride(2)),
        indices_(indices.data_ptr<int64_t>()),
        sq_dist_(sq_dist.data_ptr<float>()),
        kernel_(pick_scan_kernel<false>(dim_)),
        kernel_excluding_neg_inf_(pick_scan_kernel<true>(dim_)) {}

  void run() {
    compute_code_norms();
    plan_tasks();
    if (prepacked_) {
      const int64_t padded_codes = at::round_up(codes_, kCodesPerPanel);
      prepacked_panels_storage_ = at::empty({padded_codes * std::max<int64_t>(dim_, 1)}, at::kFloat);
      prepacked_norms_storage_ = at::empty({padded_codes}, at::kFloat);
      pack_codes(0, 0, codes_, prepacked_panels_storage_.data_ptr<float>(), prepacked_norms_storage_.data_ptr<float>());
    }
    // Workers claim tasks one at a time, so a worker slowed down by other processes on the
    // machine does not hold the others back (a static split would).
    std::atomic<int64_t> next_task{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), task_count_);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      TaskBuffers buffers(rows_per_task_, prepacked_ ? 0 : codes_per_block_, dim_);
      for (int64_t task = next_task++; task < task_count_; task = next_task++) run_task(task, buffers);
    });
  }

 private:
  const scalar_t* z_row(int64_t group, int64_t row) const { return z_ + group * z_stride_g_ + row * z_stride_n_; }
  const scalar_t* code(int64_t group, int64_t k) const {
    return codebook_ + (codebook_groups_ == 1 ? 0 : group) * codebook_stride_g_ + k * codebook_stride_k_;
  }

  // ||e||^2 of every codeword, once per call, so every task scores a code with the same value.
  void compute_code_norms() {
    code_norms_storage_ = at::empty({codebook_groups_ * codes_}, at::kFloat);
    code_norms_ = code_norms_storage_.data_ptr<float>();
    at::parallel_for(0, codebook_groups_ * codes_, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* e = code(i / codes_, i % codes_);
        float norm = 0.f;
        for (int64_t d = 0; d < dim_; ++d) {
          const float value = static_cast<float>(e[d * codebook_stride_d_]);
          norm += value * value;
        }
        code_norms_[i] = norm;
      }
    });
  }

  // Code blocks of about kCodeBlockFloats. A shared codebook that fits in one block is packed
  // once per call (at most 256 KiB); otherwise every task packs each block into its own buffer,
  // which costs about as much as scoring the block against 16 rows, so those tasks are long
  // (kMaxRowsPerTask rows). Shorter tasks balance the workers better at the end of the call.
  void plan_tasks() {
    const int64_t block_codes = kCodeBlockFloats / std::max<int64_t>(dim_, 1) / kCodesPerPanel * kCodesPerPanel;
    codes_per_block_ = std::min(at::round_up(codes_, kCodesPerPanel), std::max(kCodesPerPanel, block_codes));
    prepacked_ = codebook_groups_ == 1 && codes_ <= codes_per_block_;
    const int64_t max_rows = prepacked_ ? kMaxRowsPerTaskPrepacked : kMaxRowsPerTask;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t micro_rows = kernel_.rows_per_micro_block;
    const int64_t wanted_tasks = std::max((groups_ * rows_ + max_rows - 1) / max_rows, 2 * threads);
    const int64_t tasks_per_group = std::max<int64_t>(1, (wanted_tasks + groups_ - 1) / groups_);
    rows_per_task_ = std::clamp(at::round_up((rows_ + tasks_per_group - 1) / tasks_per_group, micro_rows), micro_rows,
                                at::round_up(max_rows, micro_rows));
    tasks_per_group_ = (rows_ + rows_per_task_ - 1) / rows_per_task_;
    task_count_ = groups_ * tasks_per_group_;
  }

  // Rows `rows[0..count)` of the group, upcast into micro-blocks of layout [d][row]; the rows
  // that pad the last micro-block are zeros.
  void gather_rows(int64_t group, const int64_t* rows, int64_t count, int64_t micro_rows, float* z_blocks) const {
    const int64_t padded = at::round_up(count, micro_rows);
    for (int64_t i = 0; i < padded; ++i) {
      float* dst = z_blocks + (i / micro_rows) * micro_rows * dim_ + i % micro_rows;
      if (i < count) {
        const scalar_t* src = z_row(group, rows[i]);
        for (int64_t d = 0; d < dim_; ++d) dst[d * micro_rows] = static_cast<float>(src[d * z_stride_d_]);
      } else {
        for (int64_t d = 0; d < dim_; ++d) dst[d * micro_rows] = 0.f;
      }
    }
  }

  // Codes [first, first + count) upcast and scaled by -2 (exact) into panels of layout
  // [panel][d][lane], with their norms; the lanes past K hold zeros and a +inf norm, so they never win.
  void pack_codes(int64_t group, int64_t first, int64_t count, float* panels, float* panel_norms) const {
    const float* norms = code_norms_ + (codebook_groups_ == 1 ? 0 : group) * codes_;
    const int64_t padded = at::round_up(count, kCodesPerPanel);
    for (int64_t c = 0; c < padded; ++c) {
      float* dst = panels + (c / kCodesPerPanel) * dim_ * kCodesPerPanel + c % kCodesPerPanel;
      if (c < count) {
        const scalar_t* src = code(group, first + c);
        for (int64_t d = 0; d < dim_; ++d) {
          dst[d * kCodesPerPanel] = -2.f * static_cast<float>(src[d * codebook_stride_d_]);
        }
        panel_norms[c] = norms[first + c];
      } else {
        for (int64_t d = 0; d < dim_; ++d) dst[d * kCodesPerPanel] = 0.f;
        panel_norms[c] = kInf;
      }
    }
  }

  // Gathers rows[0..count) of `group` and scores them against its whole codebook, leaving each
  // row's lane winners in buffers.best[0..count).
  void scan_codebook(int64_t group, const int64_t* rows, int64_t count, const ScanKernel& kernel,
                     TaskBuffers& buffers) const {
    const int64_t micro_rows = kernel.rows_per_micro_block;
    const int64_t micro_blocks = (count + micro_rows - 1) / micro_rows;
    gather_rows(group, rows, count, micro_rows, buffers.z_blocks);
    reset(buffers.best.data(), micro_blocks * micro_rows);
    for (int64_t first = 0; first < codes_; first += codes_per_block_) {
      const int64_t block_count = std::min(codes_per_block_, codes_ - first);
      const float* panels = prepacked_panels_storage_.defined() ? prepacked_panels_storage_.data_ptr<float>()
                                                                 : buffers.panels;
      const float* panel_norms = prepacked_norms_storage_.defined() ? prepacked_norms_storage_.data_ptr<float>()
                                                                     : buffers.panel_norms;
      if (!prepacked_) pack_codes(group, first, block_count, buffers.panels, buffers.panel_norms);
      const int64_t panel_count = (block_count + kCodesPerPanel - 1) / kCodesPerPanel;
      for (int64_t m = 0; m < micro_blocks; ++m) {
        kernel.scan(buffers.z_blocks + m * micro_rows * dim_, dim_, panels, panel_norms, panel_count,
                    static_cast<int32_t>(first / kCodesPerPanel), buffers.best.data() + m * micro_rows);
      }
    }
  }

  // Lowest score over the lanes, ties to the lowest code index.
  static void reduce_lanes(const LaneBest& best, float* score, int64_t* index) {
    float best_score = kInf;
    int64_t best_index = 0;
    for (int64_t j = 0; j < kCodesPerPanel; ++j) {
      const int64_t lane_index = static_cast<int64_t>(best.panel[j]) * kCodesPerPanel + j;
      if (best.score[j] < best_score || (best.score[j] == best_score && lane_index < best_index)) {
        best_score = best.score[j];
        best_index = lane_index;
      }
    }
    *score = best_score;
    *index = best_index;
  }

  void run_task(int64_t task, TaskBuffers& buffers) const {
    const int64_t group = task / tasks_per_group_;
    const int64_t row_begin = (task % tasks_per_group_) * rows_per_task_;
    const int64_t row_count = std::min(rows_per_task_, rows_ - row_begin);
    std::vector<int64_t> rows(row_count);
    for (int64_t i = 0; i < row_count; ++i) rows[i] = row_begin + i;
    std::vector<int64_t> winners(row_count);

    scan_codebook(group, rows.data(), row_count, kernel_, buffers);
    std::vector<int64_t> rescan;  // positions of the rows whose winner is -inf
    for (int64_t i = 0; i < row_count; ++i) {
      float score;
      reduce_lanes(buffers.best[i], &score, &winners[i]);
      if (score == -kInf) rescan.push_back(i);
    }
    if (!rescan.empty()) {
      std::vector<int64_t> rescan_rows(rescan.size());
      for (size_t i = 0; i < rescan.size(); ++i) rescan_rows[i] = rows[rescan[i]];
      scan_codebook(group, rescan_rows.data(), static_cast<int64_t>(rescan.size()), kernel_excluding_neg_inf_,
                    buffers);
      for (size_t i = 0; i < rescan.size(); ++i) {
        float score;
        reduce_lanes(buffers.best[i], &score, &winners[rescan[i]]);
      }
    }

    // The winner's distance, exactly, without the cancellation of the search score.
    for (int64_t i = 0; i < row_count; ++i) {
      const scalar_t* z = z_row(group, rows[i]);
      const scalar_t* e = code(group, winners[i]);
      float sq_dist = 0.f;
      for (int64_t d = 0; d < dim_; ++d) {
        const float diff = static_cast<float>(z[d * z_stride_d_]) - static_cast<float>(e[d * codebook_stride_d_]);
        sq_dist += diff * diff;
      }
      const int64_t out = group * rows_ + rows[i];
      indices_[out] = winners[i];
      sq_dist_[out] = sq_dist;
    }
  }

  const int64_t groups_, rows_, dim_, codebook_groups_, codes_;
  const scalar_t* z_;
  const int64_t z_stride_g_, z_stride_n_, z_stride_d_;
  const scalar_t* codebook_;
  const int64_t codebook_stride_g_, codebook_stride_k_, codebook_stride_d_;
  int64_t* indices_;
  float* sq_dist_;
  const ScanKernel kernel_;
  const ScanKernel kernel_excluding_neg_inf_;
  at::Tensor code_norms_storage_;
  float* code_norms_ = nullptr;
  bool prepacked_ = false;  // the codebook is one block, packed once in prepacked_*_storage_
  at::Tensor prepacked_panels_storage_, prepacked_norms_storage_;
  int64_t rows_per_task_ = 0, codes_per_block_ = 0, tasks_per_group_ = 0, task_count_ = 0;
};

std::tuple<at::Tensor, at::Tensor> nearest_codeword_cpu(const at::Tensor& z, const at::Tensor& codebook) {
  check_nearest_codeword_inputs(z, codebook, c10::DeviceType::CPU);
  auto indices = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kLong));
  auto sq_dist = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, sq_dist};
  KEPLER_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "nearest_codeword_cpu", [&] {
    NearestCodewordCpu<scalar_t>(z, codebook, indices, sq_dist).run();
  });
  return {indices, sq_dist};
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CPU, m) { m.impl("nearest_codeword", &kepler::nearest_codeword_cpu); }
