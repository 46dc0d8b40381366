// Fused reverse-KL CPU kernels.
//
// Per row (token), over the first vocab_size columns of the student logits s and the teacher logits t, with
// inverse temperature k = 1/T: the forward pass is kl_row.h's single streaming pass with a = s, b = t, which gives
// the centres c_s, c_t (the rows' maxima), log Z_s, log Z_t, KL(q || p) and H(q), and then
//   log q(y) = k (s_y - c_s) - log Z_s,                 log p(y) = k (t_y - c_t) - log Z_t.
// The backward pass recomputes log q_v = k u_v - log Z_s and log p_v = k w_v - log Z_t (u_v = s_v - c_s,
// w_v = t_v - c_t) from the row statistics (c_s, log Z_s, c_t, log Z_t) and writes, in one pass,
//   grad_v = k ([q_v > 0] q_v (a (log q_v - log p_v - KL) - b - c (log q_v + H)) + b [v == y]).
//
// Dtypes: student and teacher may differ (any of float32, float64, bfloat16, float16); each is read in its
// own dtype. Per-element arithmetic (the exps, the terms) is in acc_t: double if either input is float64,
// float otherwise; the row sums are double (streaming.h's sum_terms). Per-row outputs are acc_t; the gradient has the
// student's dtype (rounded to nearest even).
//
// Rows: the logits come as [n_outer, rows_per_outer, V] views with any strides in the first two dims (each tensor its
// own; see csrc/common/row_strides.h); a row's offset is computed once per row, the columns are contiguous. The
// gradient is written contiguous, [N, Vs].
//
// Targets: an unmasked row whose target y is outside [0, vocab_size) gets log q(y) = log p(y) = NaN (and the
// rest of its outputs as usual); in the backward it has no one-hot column, but its -b q_v term stays (log q(y) =
// k s_y - lse(k s): the lse part, and its gradient, exist for any id; a vocabulary shard that does not hold a row's
// target passes such an id). No column outside [0, vocab_size) of a row is ever read. Masked rows are not read
// and may hold any target.
//
// The inner loops are written so that gcc vectorises them (OpenMP simd reductions, a branch-free exp,
// branch-free bf16/fp16 conversions); rows are spread over threads with at::parallel_for.

#include "reverse_kld.h"

#include "../common/logits_args.h"
#include "kl_row.h"
#include "streaming.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace {

using namespace minillm_cpu;  // NOLINT(build/namespaces): the shared per-element helpers

// ---------------------------------------------------------------------------------------------------------
// Backward, one row.
// ---------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct RowGrad {
  acc_t c_s, logz_s, c_t, logz_t;  // row statistics
  acc_t a, b, c, kl, entropy;      // upstream grads, forward outputs
  acc_t k;                         // inverse temperature
};

// k [q > 0] q (a (log q - log p - KL) - b - c (log q + H)), from the raw logits x (student) and y (teacher).
template <typename acc_t>
C10_ALWAYS_INLINE acc_t grad_term(const RowGrad<acc_t>& g, acc_t x, acc_t y) {
  const acc_t lq = (x - g.c_s) * g.k - g.logz_s;
  const acc_t lp = (y - g.c_t) * g.k - g.logz_t;
  const acc_t q = fast_exp(lq);
  const acc_t v = q * (g.a * ((lq - lp) - g.kl) - g.b - g.c * (lq + g.entropy));
  return where_live(q > 0, v * g.k);
}

template <typename student_t, typename teacher_t, typename acc_t>
void backward_row(const student_t* __restrict s, const teacher_t* __restrict t, student_t* __restrict out,
                  int64_t n_cols, const RowGrad<acc_t>& g) {
  const RowGrad<acc_t> gl = g;  // local copy: keeps the fields in registers in the loop
#pragma omp simd
  for (int64_t v = 0; v < n_cols; ++v) {
    store_rounded(out, v, grad_term(gl, load_as<acc_t>(s, v), load_as<acc_t>(t, v)));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks and small helpers.
// ---------------------------------------------------------------------------------------------------------
constexpr const char* kWhere = "reverse_kld (cpu)";

using logits_args::accumulation_dtype;
using logits_args::check_logits;
using logits_args::n_rows;
using logits_args::ptr_or_null;
using logits_args::BackwardRows;
using logits_args::backward_rows;
using logits_args::row_strides;
using logits_args::row_vector;


}  // namespace

std::vector<at::Tensor> reverse_kld_forward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CPU, kWhere);
  const int64_t n = n_rows(student);
  const at::Device device = student.device();
  const at::Tensor target_c = row_vector(target, n, at::kLong, device, "target", kWhere);
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, device, "mask", kWhere);
  const auto opts = student.options().dtype(accumulation_dtype(student, teacher));
  at::Tensor kl = at::empty({n}, opts);
  at::Tensor student_logprob = at::empty({n}, opts);
  at::Tensor teacher_logprob = at::empty({n}, opts);
  at::Tensor entropy = at::empty({n}, opts);
  at::Tensor row_stats = at::empty({n, 4}, opts);

  dispatch_logits_pair(student, teacher, [&](const auto* s_base, const auto* t_base) {
    using student_t = ElementOf<decltype(s_base)>;
    using teacher_t = ElementOf<decltype(t_base)>;
    using acc_t = AccOf<student_t, teacher_t>;
    const minillm::RowStrides s_rows = row_strides(student), t_rows = row_strides(teacher);
    const int64_t* tgt = ptr_or_null<int64_t>(target_c);
    const bool* msk = ptr_or_null<bool>(mask_c);
    acc_t* kl_p = kl.data_ptr<acc_t>();
    acc_t* slp_p = student_logprob.data_ptr<acc_t>();
    acc_t* tlp_p = teacher_logprob.data_ptr<acc_t>();
    acc_t* ent_p = entropy.data_ptr<acc_t>();
    acc_t* stats_p = row_stats.data_ptr<acc_t>();
    constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

    at::parallel_for(0, n, grain_rows(vocab_size), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf_s[kChunk];
      alignas(64) acc_t buf_t[kChunk];
      for (int64_t i = begin; i < end; ++i) {
        acc_t* st = stats_p + 4 * i;
        if (msk != nullptr && !msk[i]) {
          kl_p[i] = slp_p[i] = tlp_p[i] = ent_p[i] = 0;
          st[0] = st[1] = st[2] = st[3] = 0;
          continue;
        }
        const student_t* s = s_base + s_rows.offset(i);
        const teacher_t* t = t_base + t_rows.offset(i);
        const KlRow r = kl_row<acc_t>(s, t, vocab_size, inv_temperature, buf_s, buf_t);
        kl_p[i] = static_cast<acc_t>(r.kl);
        ent_p[i] = static_cast<acc_t>(r.entropy);
        st[0] = static_cast<acc_t>(r.c_a);
        st[1] = static_cast<acc_t>(r.logz_a);
        st[2] = static_cast<acc_t>(r.c_b);
        st[3] = static_cast<acc_t>(r.logz_b);
        if (tgt == nullptr) {
          slp_p[i] = tlp_p[i] = 0;
        } else if (tgt[i] >= 0 && tgt[i] < vocab_size) {
          const int64_t y = tgt[i];
          slp_p[i] = static_cast<acc_t>((double(widen(s, y)) - r.c_a) * inv_temperature - r.logz_a);
          tlp_p[i] = static_cast<acc_t>((double(widen(t, y)) - r.c_b) * inv_temperature - r.logz_b);
        } else {
          slp_p[i] = tlp_p[i] = kNaN;  // out of the vocabulary: nothing is read
        }
      }
    });
  });
  return {kl, student_logprob, teacher_logprob, entropy, row_stats};
}

at::Tensor reverse_kld_backward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_kl, const at::Tensor& grad_student_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& kl, const at::Tensor& entropy, const at::Tensor& row_stats,
    double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CPU, kWhere);
  const int64_t n = n_rows(student);
  const int64_t width = student.size(2);
  const BackwardRows rows = backward_rows(student, teacher, target, mask, grad_kl, grad_student_logprob,
                                          grad_entropy, kl, entropy, row_stats, kWhere);
  at::Tensor grad = at::empty({n, width}, student.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad);

  dispatch_logits_pair(student, teacher, [&](const auto* s_base, const auto* t_base) {
    using student_t = ElementOf<decltype(s_base)>;
    using teacher_t = ElementOf<decltype(t_base)>;
    using acc_t = AccOf<student_t, teacher_t>;
    const minillm::RowStrides s_rows = row_strides(student), t_rows = row_strides(teacher);
    student_t* g_base = grad.data_ptr<student_t>();
    const int64_t* tgt = ptr_or_null<int64_t>(rows.target);
    const bool* msk = ptr_or_null<bool>(rows.mask);
    const acc_t* a_p = ptr_or_null<acc_t>(rows.grad_kl);
    const acc_t* b_p = ptr_or_null<acc_t>(rows.grad_student_logprob);
    const acc_t* c_p = ptr_or_null<acc_t>(rows.grad_entropy);
    const acc_t* kl_p = rows.kl.data_ptr<acc_t>();
    const acc_t* ent_p = rows.entropy.data_ptr<acc_t>();
    const acc_t* stats_p = rows.row_stats.data_ptr<acc_t>();

    at::parallel_for(0, n, grain_rows(width), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        student_t* out = g_base + i * width;
        if (msk != nullptr && !msk[i]) {
          std::memset(static_cast<void*>(out), 0, sizeof(student_t) * width);
          continue;
        }
        const student_t* s = s_base + s_rows.offset(i);
        const teacher_t* t = t_base + t_rows.offset(i);
        // b counts wherever there is a target (its -b q_v term); the one-hot only for an id in the vocabulary.
        const bool in_vocab = tgt != nullptr && tgt[i] >= 0 && tgt[i] < vocab_size;
        RowGrad<acc_t> g{stats_p[4 * i], stats_p[4 * i + 1], stats_p[4 * i + 2], stats_p[4 * i + 3],
                         a_p != nullptr ? a_p[i] : acc_t(0), (b_p != nullptr && tgt != nullptr) ? b_p[i] : acc_t(0),
                         c_p != nullptr ? c_p[i] : acc_t(0), kl_p[i], ent_p[i],
                         static_cast<acc_t>(inv_temperature)};
        backward_row<student_t, teacher_t, acc_t>(s, t, out, vocab_size, g);
        if (width > vocab_size) {
          std::memset(static_cast<void*>(out + vocab_size), 0, sizeof(student_t) * (width - vocab_size));
        }
        if (in_vocab) {
          // The one-hot part b [v == y], added to the target column's term before rounding.
          const int64_t y = tgt[i];
          const acc_t term = grad_term(g, load_as<acc_t>(s, y), load_as<acc_t>(t, y));
          store_rounded(out, y, term + g.b * g.k);
        }
      }
    });
  });
  return grad;
}
