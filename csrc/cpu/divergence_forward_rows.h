// The divergence family's CPU forward, one divergence at a time: divergence_forward.cpp checks the arguments,
// allocates the outputs and calls the row loop of the divergence asked for, divergence_forward_rows<D>, whose five
// instances are compiled each in a unit of its own (divergence_forward_<divergence>.cpp; declared extern below, so
// that no other unit compiles them). One unit of the five loops took 30 s to compile; five take ~6 s each, and a
// change to one divergence's code (scripts/mutations.py's built_in) rebuilds only its unit.
// The loops: D per row, its sum_v q_v a_v and the row statistics, in one streaming pass (the forward KL) or two
// (divergence_kernel.h has the formulas).
#pragma once

#include "divergence_kernel.h"
#include "kl_row.h"
#include "streaming.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

namespace minillm_cpu {

// The forward's arguments, checked (the mask and the given row statistics undefined where not given), and its
// outputs, allocated in the accumulation dtype: divergence.h's divergence_forward.
struct ForwardRows {
  at::Tensor student, teacher, mask, given_row_stats;
  double coefficient, inv_temperature;
  int64_t vocab_size;
  at::Tensor value, mean_partial, row_stats;
};

template <minillm::DivergenceKind D>
void divergence_forward_rows(const ForwardRows& rows);

}  // namespace minillm_cpu

namespace {

// The row statistics (c_s, log Z_s, c_t, log Z_t) of one row: pass 1.
struct LogNormalisers {
  double c_s, logz_s, c_t, logz_t;
};

template <typename student_t, typename teacher_t, typename acc_t>
LogNormalisers log_normalisers(const student_t* __restrict s, const teacher_t* __restrict t, int64_t n_cols,
                               double inv_t, acc_t* __restrict buf_s, acc_t* __restrict buf_t) {
  const acc_t k = static_cast<acc_t>(inv_t);
  OnlineLogNormaliser<acc_t> student, teacher;
  for (int64_t start = 0; start < n_cols; start += kChunk) {
    const int64_t n = std::min(kChunk, n_cols - start);
    acc_t max_s, max_t;
    const acc_t* x = chunk_values(s + start, n, buf_s, max_s);
    const acc_t* y = chunk_values(t + start, n, buf_t, max_t);
    student.recentre(max_s, inv_t);
    teacher.recentre(max_t, inv_t);
    const acc_t c_s = student.centre, c_t = teacher.centre;
    const Terms<double> sums = sum_terms<2>(n, [&](int64_t j) MINILLM_INLINE_LAMBDA {
      return Terms<acc_t>{fast_exp((x[j] - c_s) * k), fast_exp((y[j] - c_t) * k)};
    });
    student.z += sums.s0;
    teacher.z += sums.s1;
  }
  return {double(student.centre), student.log_z(), double(teacher.centre), teacher.log_z()};
}

// The forward KL of one row (and its statistics) in one pass: kl_row with the teacher as the leading model.
template <typename student_t, typename teacher_t, typename acc_t>
std::pair<LogNormalisers, double> forward_kl_row(const student_t* __restrict s, const teacher_t* __restrict t,
                                                 int64_t n_cols, double inv_t, acc_t* __restrict buf_s,
                                                 acc_t* __restrict buf_t) {
  const KlRow r = kl_row<acc_t>(t, s, n_cols, inv_t, buf_t, buf_s);
  return {{r.c_b, r.logz_b, r.c_a, r.logz_a}, r.kl};
}

}  // namespace

template <minillm::DivergenceKind D>
void minillm_cpu::divergence_forward_rows(const ForwardRows& rows) {
  const at::Tensor &student = rows.student, &teacher = rows.teacher;
  const double coefficient = rows.coefficient, inv_temperature = rows.inv_temperature;
  const int64_t vocab_size = rows.vocab_size, n = n_rows(student);
  dispatch_logits_pair(student, teacher, [&](const auto* s_base, const auto* t_base) {
    using student_t = ElementOf<decltype(s_base)>;
    using teacher_t = ElementOf<decltype(t_base)>;
    using acc_t = AccOf<student_t, teacher_t>;
    const minillm::RowStrides s_rows = row_strides(student), t_rows = row_strides(teacher);
    const bool* msk = ptr_or_null<bool>(rows.mask);
    acc_t* value_p = rows.value.data_ptr<acc_t>();
    acc_t* partial_p = rows.mean_partial.data_ptr<acc_t>();
    acc_t* stats_p = rows.row_stats.data_ptr<acc_t>();
    const acc_t* given_p = ptr_or_null<acc_t>(rows.given_row_stats);

    at::parallel_for(0, n, grain_rows(vocab_size), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf_s[kChunk];
      alignas(64) acc_t buf_t[kChunk];
      for (int64_t i = begin; i < end; ++i) {
        acc_t* st = stats_p + 4 * i;
        if (msk != nullptr && !msk[i]) {
          value_p[i] = partial_p[i] = 0;
          st[0] = st[1] = st[2] = st[3] = 0;
          continue;
        }
        const student_t* s = s_base + s_rows.offset(i);
        const teacher_t* t = t_base + t_rows.offset(i);
        LogNormalisers z;
        double total, partial;
        if (D == Divergence::kForwardKl && given_p == nullptr) {
          const auto [stats, kl] = forward_kl_row<student_t, teacher_t, acc_t>(s, t, vocab_size, inv_temperature,
                                                                              buf_s, buf_t);
          z = stats;
          total = kl;
          partial = -1;  // sum_v q_v a_v = -sum_v p_v
        } else {
          // Pass 1, unless the caller gives the statistics (a sharded vocabulary's global log-normalisers).
          z = given_p != nullptr
              ? LogNormalisers{double(given_p[4 * i]), double(given_p[4 * i + 1]), double(given_p[4 * i + 2]),
                               double(given_p[4 * i + 3])}
              : log_normalisers<student_t, teacher_t, acc_t>(s, t, vocab_size, inv_temperature, buf_s, buf_t);
          const Row<acc_t> r = row_of<acc_t>(D, coefficient, inv_temperature, z.c_s, z.logz_s, z.c_t, z.logz_t);
          const Terms<double> sums = sum_terms<2>(vocab_size, [&](int64_t v) MINILLM_INLINE_LAMBDA {
            const Column<acc_t> c = column<D>(r, load_as<acc_t>(s, v), load_as<acc_t>(t, v));
            return Terms<acc_t>{c.value, c.partial};
          });
          total = sums.s0;
          partial = sums.s1;
          if constexpr (D == Divergence::kForwardKl) total += (z.logz_t - z.logz_s) * partial;  // -(gap) sum_v p_v
        }
        // NaN logits make a log-normaliser NaN, and every q_v, p_v with it: the terms alone would drop them.
        const double nan_of_logits = (z.logz_s - z.logz_s) + (z.logz_t - z.logz_t);
        value_p[i] = static_cast<acc_t>(total + nan_of_logits);
        partial_p[i] = static_cast<acc_t>(partial + nan_of_logits);
        st[0] = static_cast<acc_t>(z.c_s);
        st[1] = static_cast<acc_t>(z.logz_s);
        st[2] = static_cast<acc_t>(z.c_t);
        st[3] = static_cast<acc_t>(z.logz_t);
      }
    });
  });
}

// Compiled in divergence_forward_<divergence>.cpp, one each.
extern template void minillm_cpu::divergence_forward_rows<Divergence::kForwardKl>(const minillm_cpu::ForwardRows&);
extern template void minillm_cpu::divergence_forward_rows<Divergence::kJsd>(const minillm_cpu::ForwardRows&);
extern template void minillm_cpu::divergence_forward_rows<Divergence::kSkewForwardKl>(
    const minillm_cpu::ForwardRows&);
extern template void minillm_cpu::divergence_forward_rows<Divergence::kSkewReverseKl>(
    const minillm_cpu::ForwardRows&);
extern template void minillm_cpu::divergence_forward_rows<Divergence::kTvd>(const minillm_cpu::ForwardRows&);
