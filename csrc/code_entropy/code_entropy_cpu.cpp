// CPU kernels of kepler::code_entropy(z (G, N, D), codebook (Gc, K, D), scale, inv_temperature)
// -> (row_stats (G, N, 3), code_mass (G, K)) and of its backward (kepler/reference/code_entropy.py
// is the spec: scores c = ||e'||^2 - 2 z'.e' at the scaled inputs, t = (c - c_min) alpha,
// l = sum exp(-t), H = log l + sum t exp(-t) / l, p = exp(-t - log l)).
//
// No N x K matrix: the scores are recomputed tile by tile, each tile (a micro-block of rows x a
// block of codes) by the shared register-blocked micro-kernel (common/score_kernel.h) into an
// L1-sized buffer, and an epilogue of this file reduces it there.
//
// Forward: row tasks (up to kMaxRowsPerTask rows of one group) claimed one at a time by the
// workers. A task upcasts its rows once, then makes three passes over the code blocks: the row
// minima (and whether a row has a non-finite score), then l and sum t exp(-t) relative to the final
// minimum (so every term underflows exactly as in the reference: a saturated row gets H = 0
// exactly), then the column sums of p into a thread-local K vector, added to a float64 total.
//
// Backward, with w_k = log code_mass_k - log N and r_n = sum_k p w_k:
//   G[n, k] = -(p / N)(g_s (log p + H_n) + g_b (w_k - r_n)).
// A row task makes two passes over the code blocks: r_n, then G tile by tile and the small GEMM
// sum_k G e'_k, so grad_z[n] = 2 alpha scale sum_k G e'_k. G is formed term by term as in the
// reference rather than folded into sum_k A e' + (g_b r_n / N) sum_k p e' (one pass less): the
// fold cancels two O(1) sums where G is tiny, and alpha (up to FLT_MAX for huge inputs) amplifies
// that into large gradients of rows that are one-hot, whose gradient is exactly 0. Then code-block
// tasks, each over every row of the groups that share its codes, accumulate sum_n G z'_n and
// sum_n G into a block-sized buffer: grad_e[k] = 2 alpha scale (sum_n G z'_n - e'_k sum_n G).
// Extra memory: O(threads x (rows per task x D + K)) and O(G (N + K)) for the per-row r_n and the
// per-code w_k.
//
// The epilogues run in the vector width of the micro-kernel that was picked (score_kernel.h), each
// compiled once per instruction set from one template.
#include "code_entropy/code_entropy_checks.h"
#include "code_entropy/code_entropy_epilogues.h"
#include "common/dispatch.h"
#include "common/score_kernel.h"
#include "common/simd.h"
#include "common/vector_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

// GCC notes at the end of the file that vector arguments would change the call ABI without AVX;
// they never cross a call here (force-inlined helpers), so the note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kepler {
namespace {

using code_entropy_detail::Epilogues;
using code_entropy_detail::epilogues_for;
using code_entropy_detail::Gemm;
using code_entropy_detail::kInf;
using code_entropy_detail::Tile;
using score::kCodeAlign;

constexpr int64_t kMaxRowsPerTask = 512;  // rows sharing each packing of the codes
constexpr int64_t kMaxBlockCodes = 256;         // codes per block of the row passes
constexpr int64_t kMaxCodePassBlockCodes = 128;  // codes per task of the grad_codebook pass
constexpr int64_t kPanelBudgetFloats = 1 << 16;  // 256 KiB of packed codes: stays in L2
constexpr int64_t kCodePassMicroBlocks = 4;      // micro-blocks of rows scored per GEMM of that pass

// Runs task(index, state) for index in [0, count), the workers claiming tasks one at a time (a
// worker slowed down by other processes does not hold the others back); each worker makes its
// own state (its buffers) once.
template <typename MakeState, typename Task>
void run_tasks(int64_t count, MakeState make_state, Task task) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t i = next++; i < count; i = next++) task(i, state);
  });
}

// A float32 buffer of at least `count` elements, 64-byte aligned (at::empty).
struct Buffer {
  at::Tensor storage;
  float* data;
  explicit Buffer(int64_t count) : storage(at::empty({std::max<int64_t>(count, 1)}, at::kFloat)),
                                   data(storage.data_ptr<float>()) {}
};

template <typename scalar_t>
class CodeEntropyCpu {
 public:
  CodeEntropyCpu(const at::Tensor& z, const at::Tensor& codebook, float scale, double inv_temperature)
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
        scale_(scale),
        kernel_(score::pick_score_kernel(dim_)),
        epilogues_(epilogues_for(kernel_.isa)) {
    // alpha in float64 (scale^2 underflows float32 for huge inputs), capped so that the winner's
    // logit is never 0 * inf.
    alpha_ = static_cast<float>(std::min(inv_temperature / (static_cast<double>(scale) * scale),
                                         static_cast<double>(FLT_MAX)));
    grad_factor_ = 2.0 * alpha_ * scale_;  // float64: 2 alpha may overflow float32 where G is 0
    const int64_t R = kernel_.rows;
    dpad_ = round_up(std::max<int64_t>(dim_, 1), epilogues_.lanes);
    block_codes_ = std::clamp(kPanelBudgetFloats / std::max<int64_t>(dim_, 1) / kCodeAlign * kCodeAlign, kCodeAlign,
                              kMaxBlockCodes);
    code_pass_block_ = std::min(block_codes_, kMaxCodePassBlockCodes);
    padded_codes_ = round_up(codes_, kCodeAlign);
    // Row tasks: at least two per worker, so that the workers finish together.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t wanted_tasks = std::max(ceil_div(groups_ * rows_, kMaxRowsPerTask), 2 * threads);
    const int64_t tasks_per_group = std::max<int64_t>(1, ceil_div(wanted_tasks, groups_));
    rows_per_task_ = std::clamp(round_up(ceil_div(rows_, tasks_per_group), R), R, round_up(kMaxRowsPerTask, R));
    tasks_per_group_ = ceil_div(rows_, rows_per_task_);
  }

  void forward(float* row_stats, float* code_mass) const {
    std::vector<double> mass_total(groups_ * codes_, 0.0);
    std::vector<char> group_bad(groups_, 0);
    std::mutex mutex;
    run_tasks(
        groups_ * tasks_per_group_, [&] { return RowState(*this, false); },
        [&](int64_t task, RowState& s) {
          const int64_t g = task / tasks_per_group_, n0 = (task % tasks_per_group_) * rows_per_task_;
          const int64_t count = std::min(rows_per_task_, rows_ - n0);
          forward_rows(g, n0, count, s, row_stats);
          std::lock_guard<std::mutex> lock(mutex);
          for (int64_t k = 0; k < codes_; ++k) mass_total[g * codes_ + k] += s.mass.data[k];
          for (int64_t i = 0; i < count; ++i) group_bad[g] |= !s.ok[i];
        });
    for (int64_t g = 0; g < groups_; ++g) {
      for (int64_t k = 0; k < codes_; ++k) {
        code_mass[g * codes_ + k] =
            group_bad[g] ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(mass_total[g * codes_ + k]);
      }
    }
  }

  void backward(const float* grad_per_sample, const float* grad_batch, const float* row_stats, const float* code_mass,
                scalar_t* grad_z, scalar_t* grad_codebook) const {
    // w_k = log code_mass_k - log N (0 for an unused code, whose p are all 0; NaN for a group with
    // a non-finite row, which makes all its gradients NaN, as in the reference), 0 on the padding.
    std::vector<float> w(groups_ * padded_codes_, 0.f);
    const double log_rows = std::log(static_cast<double>(rows_));
    for (int64_t g = 0; g < groups_; ++g) {
      for (int64_t k = 0; k < codes_; ++k) {
        const double mass = code_mass[g * codes_ + k];
        w[g * padded_codes_ + k] = mass == 0.0 ? 0.f : static_cast<float>(std::log(mass) - log_rows);
      }
    }
    // r_n = sum_k p w as two floats (float64 precision), from the row pass for the code pass
    std::vector<float> r_n(2 * groups_ * rows_);
    run_tasks(
        groups_ * tasks_per_group_, [&] { return RowState(*this, true); },
        [&](int64_t task, RowState& s) {
          const int64_t g = task / tasks_per_group_, n0 = (task % tasks_per_group_) * rows_per_task_;
          grad_z_rows(g, n0, std::min(rows_per_task_, rows_ - n0), s, grad_per_sample[g], grad_batch[g], row_stats,
                      w.data() + g * padded_codes_, r_n.data(), grad_z);
        });
    const int64_t blocks = ceil_div(codes_, code_pass_block_);
    run_tasks(
        codebook_groups_ * blocks, [&] { return CodeState(*this); },
        [&](int64_t task, CodeState& s) {
          grad_code_block(task / blocks, (task % blocks) * code_pass_block_, s, grad_per_sample, grad_batch,
                          row_stats, w.data(), r_n.data(), grad_codebook);
        });
  }

 private:
  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
  static int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

  // One worker's buffers for the row tasks (forward, and grad_z with `gradient`).
  struct RowState {
    Buffer z_blocks, panels, norms, scores, mass, e_rows, acc;
    std::vector<float> row_min, row_bad, log_l, entropy, r_n, r_n_lo;
    std::vector<double> row_l, row_s;
    std::vector<int32_t> ok;
    RowState(const CodeEntropyCpu& op, bool gradient)
        : z_blocks(op.rows_per_task_ * op.dim_),
          panels(op.block_codes_ * op.dim_),
          norms(op.block_codes_),
          scores(op.kernel_.rows * op.block_codes_),
          mass(gradient ? 0 : op.padded_codes_),
          e_rows(gradient ? op.block_codes_ * op.dpad_ : 0),
          acc(gradient ? op.rows_per_task_ * op.dpad_ : 0),
          row_min(op.rows_per_task_),
          row_bad(op.rows_per_task_),
          log_l(op.rows_per_task_),
          entropy(op.rows_per_task_),
          r_n(op.rows_per_task_),
          r_n_lo(op.rows_per_task_),
          row_l(op.rows_per_task_),
          row_s(op.rows_per_task_),
          ok(op.rows_per_task_) {}
  };

  // One worker's buffers for the code blocks of the grad_codebook pass.
  struct CodeState {
    Buffer panels, norms, z_blocks, z_rows, scores, colsum, acc;
    std::vector<float> row_min, log_l, entropy;
    explicit CodeState(const CodeEntropyCpu& op)
        : panels(op.code_pass_block_ * op.dim_),
          norms(op.code_pass_block_),
          z_blocks(kCodePassMicroBlocks * op.kernel_.rows * op.dim_),
          z_rows(kCodePassMicroBlocks * op.kernel_.rows * op.dpad_),
          scores(kCodePassMicroBlocks * op.kernel_.rows * op.code_pass_block_),
          colsum(op.code_pass_block_),
          acc(op.code_pass_block_ * op.dpad_),
          row_min(kCodePassMicroBlocks * op.kernel_.rows),
          log_l(row_min.size()),
          entropy(row_min.size()) {
      std::fill(z_rows.data, z_rows.data + kCodePassMicroBlocks * op.kernel_.rows * op.dpad_, 0.f);
    }
  };

  const scalar_t* z_row(int64_t g, int64_t n) const { return z_ + g * z_stride_g_ + n * z_stride_n_; }
  const scalar_t* code(int64_t g, int64_t k) const {
    return codebook_ + (codebook_groups_ == 1 ? 0 : g) * codebook_stride_g_ + k * codebook_stride_k_;
  }

  // Rows [n0, n0 + count) of group g, upcast and scaled into consecutive z blocks.
  void gather_rows(int64_t g, int64_t n0, int64_t count, float* z_blocks) const {
    const int64_t R = kernel_.rows;
    for (int64_t m = 0; m * R < count; ++m) {
      score::gather_z_block(z_row(g, n0 + m * R), z_stride_n_, z_stride_d_, std::min(R, count - m * R), R, dim_,
                            scale_, z_blocks + m * R * dim_);
    }
  }

  // Scores the task's z blocks against the codebook of group g, block by block (each block packed
  // once, then every micro-block of rows scored against it), and hands each tile to fn(tile, first
  // row, first code).
  template <typename Fn>
  void sweep_codes(int64_t g, int64_t count, RowState& s, Fn fn) const {
    const int64_t R = kernel_.rows;
    for (int64_t k0 = 0; k0 < codes_; k0 += block_codes_) {
      const int64_t block = std::min(block_codes_, codes_ - k0);
      const int64_t padded = round_up(block, kCodeAlign);
      score::pack_code_panels(code(g, k0), codebook_stride_k_, codebook_stride_d_, block, dim_, scale_, kInf,
                              s.panels.data, s.norms.data);
      fn(Tile{}, -1, k0);  // a new block: the caller packs what else it needs
      for (int64_t r0 = 0; r0 < count; r0 += R) {
        kernel_.score_block(s.z_blocks.data + r0 * dim_, dim_, s.panels.data, s.norms.data, padded, s.scores.data,
                            block_codes_);
        Tile t{};
        t.scores = s.scores.data;
        t.ld = block_codes_;
        t.rows = std::min(R, count - r0);
        t.codes = block;
        t.padded_codes = padded;
        t.alpha = alpha_;
        fn(t, r0, k0);
      }
    }
  }

  void forward_rows(int64_t g, int64_t n0, int64_t count, RowState& s, float* row_stats) const {
    gather_rows(g, n0, count, s.z_blocks.data);
    std::fill(s.row_min.begin(), s.row_min.end(), kInf);
    std::fill(s.row_bad.begin(), s.row_bad.end(), 0.f);
    std::fill(s.row_l.begin(), s.row_l.end(), 0.0);
    std::fill(s.row_s.begin(), s.row_s.end(), 0.0);
    // Pass 1: the row minima, and whether each row's scores are all finite.
    sweep_codes(g, count, s, [&](Tile t, int64_t r0, int64_t) {
      if (r0 < 0) return;
      t.row_min = s.row_min.data() + r0;
      t.row_bad = s.row_bad.data() + r0;
      epilogues_.min_pass(t);
    });
    // Pass 2: l and sum t exp(-t) with t relative to the final minimum.
    sweep_codes(g, count, s, [&](Tile t, int64_t r0, int64_t) {
      if (r0 < 0) return;
      t.row_min = s.row_min.data() + r0;
      t.row_l = s.row_l.data() + r0;
      t.row_s = s.row_s.data() + r0;
      epilogues_.stats_pass(t);
    });
    bool any_ok = false;
    for (int64_t i = 0; i < count; ++i) {
      float* out = row_stats + ((g * rows_) + n0 + i) * 3;
      s.ok[i] = s.row_bad[i] == 0.f;
      any_ok |= s.ok[i] != 0;
      const double log_l = std::log(s.row_l[i]);
      const float nan = std::numeric_limits<float>::quiet_NaN();
      out[0] = s.row_min[i];
      out[1] = s.log_l[i] = s.ok[i] ? static_cast<float>(log_l) : nan;
      out[2] = s.ok[i] ? static_cast<float>(log_l + s.row_s[i] / s.row_l[i]) : nan;
    }
    // Pass 3: column sums of p = exp(-t - log l), with the log l just stored (the backward's).
    std::fill(s.mass.data, s.mass.data + padded_codes_, 0.f);
    if (!any_ok) return;
    sweep_codes(g, count, s, [&](Tile t, int64_t r0, int64_t k0) {
      if (r0 < 0) return;
      t.row_min = s.row_min.data() + r0;
      t.log_l = s.log_l.data() + r0;
      t.row_ok = s.ok.data() + r0;
      t.mass = s.mass.data + k0;
      epilogues_.mass_pass(t);
    });
  }

  // Copies (c_min, log l, H) of rows [n0, n0 + count) of group g into the state's row arrays.
  static void read_row_stats(const float* row_stats, int64_t first, int64_t count, float* row_min, float* log_l,
                             float* entropy) {
    for (int64_t i = 0; i < count; ++i) {
      const float* stats = row_stats + (first + i) * 3;
      row_min[i] = stats[0];
      log_l[i] = stats[1];
      entropy[i] = stats[2];
    }
  }

  // grad_z of rows [n0, n0 + count) of group g: r_n in a first sweep over the codes, then G tile
  // by tile and the GEMM sum_k G e'_k; r_n is kept for the code pass.
  void grad_z_rows(int64_t g, int64_t n0, int64_t count, RowState& s, float grad_s, float grad_b,
                   const float* row_stats, const float* w, float* r_n, scalar_t* grad_z) const {
    const int64_t R = kernel_.rows;
    gather_rows(g, n0, count, s.z_blocks.data);
    read_row_stats(row_stats, g * rows_ + n0, count, s.row_min.data(), s.log_l.data(), s.entropy.data());
    std::fill(s.row_l.begin(), s.row_l.end(), 0.0);  // sum_k p w
    std::fill(s.row_s.begin(), s.row_s.end(), 0.0);  // sum_k p
    std::fill(s.acc.data, s.acc.data + rows_per_task_ * dpad_, 0.f);
    const float gs_n = grad_s / rows_, gb_n = grad_b / rows_;
    auto prepare = [&](Tile& t, int64_t r0, int64_t k0) {
      t.row_min = s.row_min.data() + r0;
      t.log_l = s.log_l.data() + r0;
      t.entropy = s.entropy.data() + r0;
      t.w = w + k0;
      t.gs_n = gs_n;
      t.gb_n = gb_n;
    };
    sweep_codes(g, count, s, [&](Tile t, int64_t r0, int64_t k0) {
      if (r0 < 0) return;
      prepare(t, r0, k0);
      t.r_sum = s.row_l.data() + r0;
      t.row_s = s.row_s.data() + r0;
      epilogues_.r_sum_pass(t);
    });
    for (int64_t i = 0; i < count; ++i) {
      const double r = s.row_l[i] / s.row_s[i];
      s.r_n[i] = r_n[g * rows_ + n0 + i] = static_cast<float>(r);
      s.r_n_lo[i] = r_n[(groups_ + g) * rows_ + n0 + i] = static_cast<float>(r - s.r_n[i]);
    }
    sweep_codes(g, count, s, [&](Tile t, int64_t r0, int64_t k0) {
      const int64_t block = std::min(block_codes_, codes_ - k0);
      if (r0 < 0) {  // the block's codes e' as rows of dpad_ floats, zero padded, for the GEMM
        std::fill(s.e_rows.data, s.e_rows.data + block_codes_ * dpad_, 0.f);
        for (int64_t k = 0; k < block; ++k) {
          const scalar_t* e = code(g, k0 + k);
          for (int64_t d = 0; d < dim_; ++d) {
            s.e_rows.data[k * dpad_ + d] = static_cast<float>(e[d * codebook_stride_d_]) * scale_;
          }
        }
        return;
      }
      prepare(t, r0, k0);
      t.r_n = s.r_n.data() + r0;
      t.r_n_lo = s.r_n_lo.data() + r0;
      epilogues_.gradient_pass(t);  // the padding rows' sums are never read
      epilogues_.gemm(Gemm{s.acc.data + r0 * dpad_, dpad_, R, dpad_, s.scores.data,
                           block_codes_, 1, s.e_rows.data, dpad_, t.padded_codes});
    });
    for (int64_t i = 0; i < count; ++i) {
      const float* sum = s.acc.data + i * dpad_;  // sum_k G e'
      scalar_t* out = grad_z + (g * rows_ + n0 + i) * dim_;
      for (int64_t d = 0; d < dim_; ++d) out[d] = static_cast<scalar_t>(static_cast<float>(grad_factor_ * sum[d]));
    }
  }

  void grad_code_block(int64_t gc, int64_t k0, CodeState& s, const float* grad_per_sample, const float* grad_batch,
                       const float* row_stats, const float* w, const float* r_n, scalar_t* grad_codebook) const {
    const int64_t R = kernel_.rows, ld = code_pass_block_, chunk = kCodePassMicroBlocks * R;
    const int64_t block = std::min(code_pass_block_, codes_ - k0);
    const int64_t padded = round_up(block, kCodeAlign);
    score::pack_code_panels(code(gc, k0), codebook_stride_k_, codebook_stride_d_, block, dim_, scale_, kInf,
                            s.panels.data, s.norms.data);
    std::fill(s.colsum.data, s.colsum.data + code_pass_block_, 0.f);
    std::fill(s.acc.data, s.acc.data + code_pass_block_ * dpad_, 0.f);
    for (int64_t g = 0; g < groups_; ++g) {
      if (codebook_groups_ != 1 && g != gc) continue;
      for (int64_t n0 = 0; n0 < rows_; n0 += chunk) {
        const int64_t count = std::min(chunk, rows_ - n0);
        gather_rows(g, n0, count, s.z_blocks.data);
        for (int64_t r0 = 0; r0 < count; r0 += R) {
          kernel_.score_block(s.z_blocks.data + r0 * dim_, dim_, s.panels.data, s.norms.data, padded,
                              s.scores.data + r0 * ld, ld);
        }
        for (int64_t i = 0; i < count; ++i) {
          const scalar_t* z = z_row(g, n0 + i);
          for (int64_t d = 0; d < dim_; ++d) s.z_rows.data[i * dpad_ + d] = static_cast<float>(z[d * z_stride_d_]) * scale_;
        }
        read_row_stats(row_stats, g * rows_ + n0, count, s.row_min.data(), s.log_l.data(), s.entropy.data());
        Tile t{};
        t.scores = s.scores.data;
        t.ld = ld;
        t.rows = count;
        t.codes = block;
        t.padded_codes = padded;
        t.alpha = alpha_;
        t.row_min = s.row_min.data();
        t.log_l = s.log_l.data();
        t.entropy = s.entropy.data();
        t.w = w + g * padded_codes_ + k0;
        t.gs_n = grad_per_sample[g] / rows_;
        t.gb_n = grad_batch[g] / rows_;
        t.r_n = r_n + g * rows_ + n0;
        t.r_n_lo = r_n + (groups_ + g) * rows_ + n0;
        t.mass = s.colsum.data;
        epilogues_.gradient_sums_pass(t);  // G in place of the scores
        epilogues_.gemm(Gemm{s.acc.data, dpad_, padded, dpad_, s.scores.data, 1, ld, s.z_rows.data, dpad_, count});
      }
    }
    for (int64_t k = 0; k < block; ++k) {
      const scalar_t* e = code(gc, k0 + k);
      scalar_t* out = grad_codebook + (gc * codes_ + k0 + k) * dim_;
      const double colsum = s.colsum.data[k];
      for (int64_t d = 0; d < dim_; ++d) {
        const double e_d = static_cast<float>(e[d * codebook_stride_d_]) * scale_;
        out[d] = static_cast<scalar_t>(static_cast<float>(grad_factor_ * (s.acc.data[k * dpad_ + d] - e_d * colsum)));
      }
    }
  }

  const int64_t groups_, rows_, dim_, codebook_groups_, codes_;
  const scalar_t* z_;
  const int64_t z_stride_g_, z_stride_n_, z_stride_d_;
  const scalar_t* codebook_;
  const int64_t codebook_stride_g_, codebook_stride_k_, codebook_stride_d_;
  const float scale_;
  const score::ScoreKernel kernel_;
  const Epilogues epilogues_;
  float alpha_ = 0.f;
  double grad_factor_ = 0.0;
  int64_t dpad_ = 0, block_codes_ = 0, code_pass_block_ = 0, padded_codes_ = 0;
  int64_t rows_per_task_ = 0, tasks_per_group_ = 0;
};

float read_scale(const at::Tensor& scale, const char* op) {
  const float value = scale.item<float>();
  check_code_entropy_scale_value(value, op);
  return value;
}

std::tuple<at::Tensor, at::Tensor> code_entropy_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                    const at::Tensor& scale, double inv_temperature) {
  check_code_entropy_inputs(z, codebook, scale, inv_temperature, c10::DeviceType::CPU);
  const float scale_value = read_scale(scale, "kepler::code_entropy");
  auto row_stats = at::empty({z.size(0), z.size(1), 3}, z.options().dtype(at::kFloat));
  auto code_mass = at::zeros({z.size(0), codebook.size(1)}, z.options().dtype(at::kFloat));
  if (row_stats.numel() == 0) return {row_stats, code_mass};
  KEPLER_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "code_entropy_cpu", [&] {
    CodeEntropyCpu<scalar_t>(z, codebook, scale_value, inv_temperature)
        .forward(row_stats.data_ptr<float>(), code_mass.data_ptr<float>());
  });
  return {row_stats, code_mass};
}

std::tuple<at::Tensor, at::Tensor> code_entropy_backward_cpu(const at::Tensor& grad_per_sample,
                                                             const at::Tensor& grad_batch, const at::Tensor& z,
                                                             const at::Tensor& codebook, const at::Tensor& scale,
                                                             double inv_temperature, const at::Tensor& row_stats,
                                                             const at::Tensor& code_mass) {
  check_code_entropy_backward_inputs(grad_per_sample, grad_batch, z, codebook, scale, inv_temperature, row_stats,
                                     code_mass, c10::DeviceType::CPU);
  const float scale_value = read_scale(scale, "kepler::code_entropy_backward");
  auto grad_z = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  auto grad_codebook = at::empty(codebook.sizes(), codebook.options().memory_format(at::MemoryFormat::Contiguous));
  if (z.numel() == 0) {  // N = 0 (or G = 0, or D = 0): no row contributes
    grad_z.zero_();
    grad_codebook.zero_();
    return {grad_z, grad_codebook};
  }
  // O(G (N + K)) float32 statistics: contiguous copies cost nothing next to the kernel.
  const auto stats = row_stats.contiguous();
  const auto mass = code_mass.contiguous();
  const auto g_s = grad_per_sample.contiguous();
  const auto g_b = grad_batch.contiguous();
  KEPLER_DISPATCH_KERNEL_DTYPES(z.scalar_type(), "code_entropy_backward_cpu", [&] {
    CodeEntropyCpu<scalar_t>(z, codebook, scale_value, inv_temperature)
        .backward(g_s.data_ptr<float>(), g_b.data_ptr<float>(), stats.data_ptr<float>(), mass.data_ptr<float>(),
                  grad_z.data_ptr<scalar_t>(), grad_codebook.data_ptr<scalar_t>());
  });
  return {grad_z, grad_codebook};
}

}  // namespace
}  // namespace kepler

TORCH_LIBRARY_IMPL(kepler, CPU, m) {
  m.impl("code_entropy", &kepler::code_entropy_cpu);
  m.impl("code_entropy_backward", &kepler::code_entropy_backward_cpu);
}
