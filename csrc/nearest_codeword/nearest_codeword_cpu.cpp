// CPU kernel of kepler::nearest_codeword(z (G, N, D), codebook (Gc, K, D)) -> (indices, sq_dist).
//
// A fused, blocked search that never materializes an N x K distance matrix. Rows of z are split
// into tasks of up to kMaxRowsPerTask rows (at::parallel_for over (group, row chunk)). A task
// upcasts its rows to float32 into a thread-local buffer, then walks the codebook in blocks of
// codes sized to stay in the L2 cache: each block is upcast, scaled by -2 (exact) and packed
// into panels of 16 codes, and a register-blocked micro-kernel (6 rows x 16 codes) computes the
// search score ||e||^2 - 2 z.e with float32 accumulation (started from the precomputed ||e||^2)
// and merges it into a per-row, per-lane running (score, index) with a strict `<`. The per-lane
// winners are reduced with the lowest-index tie-break, and the winner's distance is recomputed
// exactly as sum_d (z_d - e_d)^2 in float32 from the inputs.
//
// Inputs are read through their strides (no .contiguous() copy) and bfloat16/float16 are upcast
// only into the task's buffers, so the extra memory is a few hundred KiB per thread.
//
// Non-finite scores never win. NaN and +inf lose every `<` by themselves; -inf would win it, and
// excluding it costs two more vector operations per score, so the hot pass does not: a row whose
// winner is -inf (an overflowing z . e) is scanned again by the same kernel with the exclusion on.
//
// x86-64 machines with AVX2 + FMA run the intrinsics micro-kernel (compiled for that target only
// and picked at run time, so the library still runs on older CPUs); others run a portable one.
// KEPLER_DISABLE_AVX2=1 forces the portable one (for tests).
#include "nearest_codeword/nearest_codeword.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define KEPLER_NCW_X86 1
#include <immintrin.h>
#else
#define KEPLER_NCW_X86 0
#endif

namespace kepler {
namespace {

constexpr int64_t kRowsPerMicroBlock = 6;  // z rows per micro-kernel call (6 x 2 accumulators)
constexpr int64_t kCodesPerPanel = 16;     // codes per packed panel (two 8-float vectors)
constexpr int64_t kMaxRowsPerTask = 192;   // z rows that share one packing of each code block
constexpr int64_t kCodeBlockFloats = 1 << 16;  // 256 KiB of packed codes: stays in L2

constexpr float kInf = std::numeric_limits<float>::infinity();

// Running winner of one z row, one slot per panel lane: lane j has seen codes k = j (mod 16).
struct alignas(64) LaneBest {
  float score[kCodesPerPanel];
  int32_t index[kCodesPerPanel];
};

void reset(LaneBest* best, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    std::fill(best[i].score, best[i].score + kCodesPerPanel, kInf);
    // Lanes that never win keep +inf and index 0, so a row without any finite score gets 0.
    std::fill(best[i].index, best[i].index + kCodesPerPanel, 0);
  }
}

// Scores one micro-block of kRowsPerMicroBlock z rows (layout [d][row], float32) against
// `num_panels` packed panels (layout [panel][d][lane], holding -2 * e) whose first code is
// `first_index`, and merges the scores into best[0..kRowsPerMicroBlock).
using ScanPanelsFn = void (*)(const float* z_block, int64_t dim, const float* panels, const float* panel_norms,
                              int64_t num_panels, int32_t first_index, LaneBest* best);

template <int kDim, bool kExcludeNegInf>
void scan_panels_portable(const float* z_block, int64_t dim, const float* panels, const float* panel_norms,
                          int64_t num_panels, int32_t first_index, LaneBest* best) {
  const int64_t D = kDim > 0 ? kDim : dim;
  for (int64_t p = 0; p < num_panels; ++p) {
    const float* panel = panels + p * D * kCodesPerPanel;
    const float* norms = panel_norms + p * kCodesPerPanel;
    float acc[kRowsPerMicroBlock][kCodesPerPanel];
    for (int64_t r = 0; r < kRowsPerMicroBlock; ++r) {
      for (int64_t j = 0; j < kCodesPerPanel; ++j) acc[r][j] = norms[j];
    }
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t r = 0; r < kRowsPerMicroBlock; ++r) {
        const float zd = z_block[d * kRowsPerMicroBlock + r];
        for (int64_t j = 0; j < kCodesPerPanel; ++j) acc[r][j] += zd * panel[d * kCodesPerPanel + j];
      }
    }
    const int32_t panel_first = first_index + static_cast<int32_t>(p * kCodesPerPanel);
    for (int64_t r = 0; r < kRowsPerMicroBlock; ++r) {
      for (int64_t j = 0; j < kCodesPerPanel; ++j) {
        const float score = acc[r][j];
        if (score < best[r].score[j] && (!kExcludeNegInf || score > -kInf)) {
          best[r].score[j] = score;
          best[r].index[j] = panel_first + static_cast<int32_t>(j);
        }
      }
    }
  }
}

#if KEPLER_NCW_X86
#define KEPLER_AVX2 __attribute__((target("avx2,fma")))

KEPLER_AVX2 inline __attribute__((always_inline)) void merge_avx2(float* best_score, int32_t* best_index,
                                                                   __m256 score, __m256i index) {
  const __m256 previous = _mm256_load_ps(best_score);
  const __m256 wins = _mm256_cmp_ps(score, previous, _CMP_LT_OQ);  // false for NaN
  _mm256_store_ps(best_score, _mm256_blendv_ps(previous, score, wins));
  const __m256 previous_index = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(best_index)));
  const __m256 merged_index = _mm256_blendv_ps(previous_index, _mm256_castsi256_ps(index), wins);
  _mm256_store_si256(reinterpret_cast<__m256i*>(best_index), _mm256_castps_si256(merged_index));
}

template <int kDim, bool kExcludeNegInf>
KEPLER_AVX2 void scan_panels_avx2(const float* z_block, int64_t dim, const float* panels, const float* panel_norms,
                                  int64_t num_panels, int32_t first_index, LaneBest* best) {
  const int64_t D = kDim > 0 ? kDim : dim;
  const __m256 neg_inf = _mm256_set1_ps(-kInf);
  const __m256i panel_step = _mm256_set1_epi32(static_cast<int32_t>(kCodesPerPanel));
  __m256i index_lo = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first_index));
  __m256i index_hi = _mm256_add_epi32(index_lo, _mm256_set1_epi32(8));
  for (int64_t p = 0; p < num_panels; ++p) {
    const float* panel = panels + p * D * kCodesPerPanel;
    const __m256 norm_lo = _mm256_load_ps(panel_norms + p * kCodesPerPanel);
    const __m256 norm_hi = _mm256_load_ps(panel_norms + p * kCodesPerPanel + 8);
    __m256 acc_lo[kRowsPerMicroBlock];
    __m256 acc_hi[kRowsPerMicroBlock];
#pragma GCC unroll 6
    for (int r = 0; r < kRowsPerMicroBlock; ++r) {
      acc_lo[r] = norm_lo;
      acc_hi[r] = norm_hi;
    }
#pragma GCC unroll 4
    for (int64_t d = 0; d < D; ++d) {
      const __m256 code_lo = _mm256_load_ps(panel + d * kCodesPerPanel);
      const __m256 code_hi = _mm256_load_ps(panel + d * kCodesPerPanel + 8);
      const float* z_d = z_block + d * kRowsPerMicroBlock;
#pragma GCC unroll 6
      for (int r = 0; r < kRowsPerMicroBlock; ++r) {
        const __m256 z_r = _mm256_broadcast_ss(z_d + r);
        acc_lo[r] = _mm256_fmadd_ps(z_r, code_lo, acc_lo[r]);
        acc_hi[r] = _mm256_fmadd_ps(z_r, code_hi, acc_hi[r]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < kRowsPerMicroBlock; ++r) {
      if (kExcludeNegInf) {
        // -inf -> +inf, which never wins; NaN stays NaN, which never wins either.
        acc_lo[r] = _mm256_blendv_ps(acc_lo[r], _mm256_set1_ps(kInf), _mm256_cmp_ps(acc_lo[r], neg_inf, _CMP_EQ_OQ));
        acc_hi[r] = _mm256_blendv_ps(acc_hi[r], _mm256_set1_ps(kInf), _mm256_cmp_ps(acc_hi[r], neg_inf, _CMP_EQ_OQ));
      }
      merge_avx2(best[r].score, best[r].index, acc_lo[r], index_lo);
      merge_avx2(best[r].score + 8, best[r].index + 8, acc_hi[r], index_hi);
    }
    index_lo = _mm256_add_epi32(index_lo, panel_step);
    index_hi = _mm256_add_epi32(index_hi, panel_step);
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif  // KEPLER_NCW_X86

bool avx2_disabled_by_env() {
  const char* value = std::getenv("KEPLER_DISABLE_AVX2");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// The micro-kernel for this machine and D; small D get a fully unrolled specialization.
template <bool kExcludeNegInf>
ScanPanelsFn pick_scan_panels(int64_t dim) {
#if KEPLER_NCW_X86
  if (cpu_has_avx2_fma() && !avx2_disabled_by_env()) {
    switch (dim) {
      case 8: return &scan_panels_avx2<8, kExcludeNegInf>;
      case 16: return &scan_panels_avx2<16, kExcludeNegInf>;
      case 32: return &scan_panels_avx2<32, kExcludeNegInf>;
      case 64: return &scan_panels_avx2<64, kExcludeNegInf>;
      default: return &scan_panels_avx2<0, kExcludeNegInf>;
    }
  }
#endif
  switch (dim) {
    case 8: return &scan_panels_portable<8, kExcludeNegInf>;
    case 16: return &scan_panels_portable<16, kExcludeNegInf>;
    default: return &scan_panels_portable<0, kExcludeNegInf>;
  }
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Thread-local float32 buffers of one task. at::empty gives 64-byte aligned storage.
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
        scan_(pick_scan_panels<false>(dim_)),
        scan_excluding_neg_inf_(pick_scan_panels<true>(dim_)) {}

  void run() {
    compute_code_norms();
    // Enough tasks for every thread, at most kMaxRowsPerTask rows each.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    rows_per_task_ = std::clamp<int64_t>(round_up((groups_ * rows_ + threads - 1) / threads, kRowsPerMicroBlock),
                                         kRowsPerMicroBlock, kMaxRowsPerTask);
    codes_per_block_ = std::min(round_up(codes_, kCodesPerPanel),
                                std::max(kCodesPerPanel, kCodeBlockFloats / std::max<int64_t>(dim_, 1) /
                                                             kCodesPerPanel * kCodesPerPanel));
    tasks_per_group_ = (rows_ + rows_per_task_ - 1) / rows_per_task_;
    at::parallel_for(0, groups_ * tasks_per_group_, 1, [&](int64_t task_begin, int64_t task_end) {
      TaskBuffers buffers(rows_per_task_, codes_per_block_, dim_);
      for (int64_t task = task_begin; task < task_end; ++task) run_task(task, buffers);
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

  // Rows `rows[0..count)` of the group, upcast into micro-blocks of layout [d][row]; the rows
  // that pad the last micro-block are zeros.
  void gather_rows(int64_t group, const int64_t* rows, int64_t count, float* z_blocks) const {
    const int64_t padded = round_up(count, kRowsPerMicroBlock);
    for (int64_t i = 0; i < padded; ++i) {
      float* dst = z_blocks + (i / kRowsPerMicroBlock) * kRowsPerMicroBlock * dim_ + i % kRowsPerMicroBlock;
      if (i < count) {
        const scalar_t* src = z_row(group, rows[i]);
        for (int64_t d = 0; d < dim_; ++d) dst[d * kRowsPerMicroBlock] = static_cast<float>(src[d * z_stride_d_]);
      } else {
        for (int64_t d = 0; d < dim_; ++d) dst[d * kRowsPerMicroBlock] = 0.f;
      }
    }
  }

  // Codes [first, first + count) upcast and scaled by -2 into panels of layout [panel][d][lane],
  // with their norms; the lanes past K hold zeros and a +inf norm, so they never win.
  void pack_codes(int64_t group, int64_t first, int64_t count, float* panels, float* panel_norms) const {
    const float* norms = code_norms_ + (codebook_groups_ == 1 ? 0 : group) * codes_;
    const int64_t padded = round_up(count, kCodesPerPanel);
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

  // Scores the gathered rows against the whole codebook of `group`.
  void scan_codebook(int64_t group, int64_t row_count, ScanPanelsFn scan, TaskBuffers& buffers) const {
    const int64_t micro_blocks = (row_count + kRowsPerMicroBlock - 1) / kRowsPerMicroBlock;
    reset(buffers.best.data(), micro_blocks * kRowsPerMicroBlock);
    for (int64_t first = 0; first < codes_; first += codes_per_block_) {
      const int64_t count = std::min(codes_per_block_, codes_ - first);
      pack_codes(group, first, count, buffers.panels, buffers.panel_norms);
      const int64_t panels = (count + kCodesPerPanel - 1) / kCodesPerPanel;
      for (int64_t m = 0; m < micro_blocks; ++m) {
        scan(buffers.z_blocks + m * kRowsPerMicroBlock * dim_, dim_, buffers.panels, buffers.panel_norms, panels,
             static_cast<int32_t>(first), buffers.best.data() + m * kRowsPerMicroBlock);
      }
    }
  }

  // Lowest score over the lanes, ties to the lowest index.
  static void reduce_lanes(const LaneBest& best, float* score, int32_t* index) {
    float best_score = kInf;
    int32_t best_index = 0;
    for (int64_t j = 0; j < kCodesPerPanel; ++j) {
      if (best.score[j] < best_score || (best.score[j] == best_score && best.index[j] < best_index)) {
        best_score = best.score[j];
        best_index = best.index[j];
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
    std::vector<int32_t> winners(row_count);

    gather_rows(group, rows.data(), row_count, buffers.z_blocks);
    scan_codebook(group, row_count, scan_, buffers);
    std::vector<int64_t> rescan;  // rows whose winner is -inf: scan again without it
    for (int64_t i = 0; i < row_count; ++i) {
      float score;
      reduce_lanes(buffers.best[i], &score, &winners[i]);
      if (score == -kInf) rescan.push_back(i);
    }
    if (!rescan.empty()) {
      std::vector<int64_t> rescan_rows(rescan.size());
      for (size_t i = 0; i < rescan.size(); ++i) rescan_rows[i] = rows[rescan[i]];
      gather_rows(group, rescan_rows.data(), static_cast<int64_t>(rescan.size()), buffers.z_blocks);
      scan_codebook(group, static_cast<int64_t>(rescan.size()), scan_excluding_neg_inf_, buffers);
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
  const ScanPanelsFn scan_;
  const ScanPanelsFn scan_excluding_neg_inf_;
  at::Tensor code_norms_storage_;
  float* code_norms_ = nullptr;
  int64_t rows_per_task_ = 0, codes_per_block_ = 0, tasks_per_group_ = 0;
};

std::tuple<at::Tensor, at::Tensor> nearest_codeword_cpu(const at::Tensor& z, const at::Tensor& codebook) {
  check_nearest_codeword_inputs(z, codebook);
  TORCH_CHECK(z.device().is_cpu(), "nearest_codeword (cpu): z and codebook must be CPU tensors, got ", z.device());
  auto indices = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kLong));
  auto sq_dist = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, sq_dist};
  switch (z.scalar_type()) {
    case at::kFloat: NearestCodewordCpu<float>(z, codebook, indices, sq_dist).run(); break;
    case at::kBFloat16: NearestCodewordCpu<c10::BFloat16>(z, codebook, indices, sq_dist).run(); break;
    case at::kHalf: NearestCodewordCpu<c10::Half>(z, codebook, indices, sq_dist).run(); break;
    default: TORCH_CHECK(false, "nearest_codeword: unreachable dtype ", z.scalar_type());
  }
  return {indices, sq_dist};
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CPU, m) { m.impl("nearest_codeword", &kepler::nearest_codeword_cpu); }
