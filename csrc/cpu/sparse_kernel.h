// The CPU kernels of the sparse teacher: D(p, q) per row of the student q = softmax(k s) (k = 1/T, the first
// vocab_size = V columns) from a teacher given as K (id, log p) pairs, its tail completed by the tail mode
// (sparse_forward.cpp), and the gradient with respect to the student logits (sparse_backward.cpp): what both units
// share. docs/design.md ("The sparse teacher") has the math and the proofs.
//
// Per row: I = the ids of the live entries (log p > -inf), K' = |I|, R = the other columns, P_I = sum_I p (float64),
// P_R = max(1 - P_I, 0) (0 where R is empty). Pass 1 streams the row with the columns of I excluded (written as -inf
// into the chunk's buffer, from the row's sorted ids): the online maximum c_R of R and Z_R = sum_R exp(k (s_v - c_R)),
// E_R = sum_R exp(k (s_v - c_R)) (s_v - c_R) (double sums, re-centred when the maximum grows). With the K gathered
// logits x_i these give, without any subtraction of sums,
//   c = the row's largest logit, log Z = log(Z_R e^{k (c_R - c)} + sum_I e^{k (x_i - c)}),
//   log q_v = k (s_v - c) - log Z,   log Q_R = k (c_R - c) + log Z_R - log Z,   H = log Z - k E / Z.
// Then per tail mode, with term(log p, log q) and qa = q dD/dq of one outcome (the divergence table):
//   bin           D = sum_I term(log p_i, log q_i) + term(log P_R, log Q_R),   M = sum_I qa_i + qa_R
//   uniform       D = sum_I term(log p_i, log q_i) + sum_R term(log pi, log q_v),   pi = P_R / (V - K'):  pass 2
//   renormalized  D = sum_I term(log p_i - lse(log p_I), k (x_i - c_I) - log Z_I)  (the K gathered columns only)
// and the backward writes, in one pass over the row, the R columns' formula, then the K columns of I:
//   grad_v = k (g (qa_v - q_v M) + b ([v = y] - q_v) - c q_v (log q_v + H)),
//   qa_v on R: bin (q_v / Q_R) qa_R, with q_v / Q_R = exp(k (s_v - c_R) - log Z_R); uniform qa(log pi, log q_v);
//   renormalized 0 (and the entries' q^, M^).
// The per-row quantities of the K entries are computed in double; the per-column ones in acc_t (double if the
// student or the log-probabilities are float64, else float), summed in double.
//
// Dtypes and rows as in the divergence family (divergence_kernel.h): the student read in its own dtype (the
// log-probabilities are read once per row into double, the ids into int64), the gradient rounded to nearest even in
// the student's dtype; [n_outer, rows_per_outer, V] row views with any strides (csrc/common/row_strides.h). Masked
// rows are not read.
// A live id outside [0, V) makes its row NaN (what a torch.compile graph, where the eager check cannot run, gets);
// nothing is read outside the row.
//
// Private to those two units: the definitions have internal linkage (an unnamed namespace), as when the family was
// one unit, so each unit compiles its own copy, and a change built into one unit only (scripts/mutations.py's
// built_in) is not swapped for the other unit's copy by the linker.
#pragma once

#include "../common/sparse_args.h"
#include "../common/sparse_kind.h"
#include "streaming.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace {  // NOLINT(build/namespaces_headers): private to the family's two units (above)

using namespace minillm_cpu;  // NOLINT(build/namespaces): the shared per-element helpers

using minillm::SparseDivergence;
using minillm::SparseTail;

constexpr const char* kWhere = "sparse_divergence (cpu)";
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <SparseDivergence D>
using DivergenceTag = std::integral_constant<SparseDivergence, D>;
template <typename F>
void with_divergence(SparseDivergence kind, F&& f) {
  switch (kind) {
    case SparseDivergence::kReverseKl: return f(DivergenceTag<SparseDivergence::kReverseKl>{});
    case SparseDivergence::kForwardKl: return f(DivergenceTag<SparseDivergence::kForwardKl>{});
    case SparseDivergence::kJsd: return f(DivergenceTag<SparseDivergence::kJsd>{});
    case SparseDivergence::kSkewForwardKl: return f(DivergenceTag<SparseDivergence::kSkewForwardKl>{});
    case SparseDivergence::kSkewReverseKl: return f(DivergenceTag<SparseDivergence::kSkewReverseKl>{});
    case SparseDivergence::kTvd: return f(DivergenceTag<SparseDivergence::kTvd>{});
  }
}

// One outcome's term of D and q a (a = dD/dq), from its log-probabilities under the teacher (log p) and the student
// (log q): the table of docs/design.md, a term whose leading probability is 0 counting 0. The mixtures' logarithms
// as in divergence_kernel.h: with delta = log p - log q and m = w p + (1 - w) q,
//   log m - log q = max(delta, 0) + tail,  log p - log m = min(delta, 0) - tail,
//   tail = log((1 - w') + w' exp(-|delta|)),  w' = w where delta <= 0, 1 - w above.
template <typename acc_t>
struct Outcome {
  acc_t term, qa;
};

template <SparseDivergence D, typename acc_t>
C10_ALWAYS_INLINE Outcome<acc_t> outcome(acc_t log_p, acc_t log_q, acc_t coefficient, acc_t teacher_weight) {
  const acc_t p = fast_exp(log_p), q = fast_exp(log_q);
  const bool p_live = p > 0, q_live = q > 0;
  const acc_t delta = log_p - log_q;
  if constexpr (D == SparseDivergence::kReverseKl) {
    return {where_live(q_live, -q * delta), where_live(q_live, q * (1 - delta))};
  } else if constexpr (D == SparseDivergence::kForwardKl) {
    return {where_live(p_live, p * delta), -p};
  } else if constexpr (D == SparseDivergence::kTvd) {
    const acc_t sign = acc_t(q > p) - acc_t(q < p);
    return {acc_t(0.5) * std::abs(p - q), acc_t(0.5) * q * sign};
  } else {
    const acc_t weight = delta > 0 ? 1 - teacher_weight : teacher_weight;
    const acc_t tail = fast_log((1 - weight) + weight * fast_exp(-std::abs(delta)));
    const acc_t log_q_over_m = -(std::max(delta, acc_t(0)) + tail);
    const acc_t log_p_over_m = std::min(delta, acc_t(0)) - tail;
    if constexpr (D == SparseDivergence::kJsd) {
      const acc_t q_term = where_live(q_live, q * log_q_over_m);
      return {coefficient * where_live(p_live, p * log_p_over_m) + (1 - coefficient) * q_term,
              (1 - coefficient) * q_term};
    } else if constexpr (D == SparseDivergence::kSkewForwardKl) {
      return {where_live(p_live, p * log_p_over_m),
              where_live(p_live, -p * (1 - coefficient * fast_exp(log_p_over_m)))};
    } else {  // the skew reverse KL
      return {where_live(q_live, q * log_q_over_m),
              where_live(q_live, q * (log_q_over_m + 1 - coefficient * fast_exp(log_q_over_m)))};
    }
  }
}

// The run-time dispatch of outcome, in double, for the per-row (O(K)) code.
struct Divergence {
  SparseDivergence kind;
  double coefficient, teacher_weight;

  Outcome<double> operator()(double log_p, double log_q) const {
    Outcome<double> result{};
    with_divergence(kind, [&](auto d) {
      result = outcome<decltype(d)::value, double>(log_p, log_q, coefficient, teacher_weight);
    });
    return result;
  }
};

// A row's live entries, in the order given: their columns, log-probabilities and the student's raw logits there; the
// columns sorted (for the exclusion of I from the streaming passes); sum_I p in double; whether a live id was out of
// range.
struct Entries {
  std::vector<int64_t> column, sorted;
  std::vector<double> log_p, logit;
  double p_sum = 0;
  bool out_of_range = false;

  int64_t n_live() const { return static_cast<int64_t>(column.size()); }
  // log P_R: P_R = max(1 - P_I, 0), 0 where R is empty; NaN with a NaN log-probability.
  double log_tail_mass(int64_t vocab_size) const {
    if (n_live() >= vocab_size) return std::isnan(p_sum) ? kNaN : kNegInf;
    const double tail = 1 - p_sum;
    return std::isnan(tail) ? kNaN : std::log(std::max(tail, 0.0));
  }
};

template <typename acc_t, typename student_t, typename id_t>
void read_entries(const student_t* s, const id_t* ids, const double* log_p, int64_t k, int64_t vocab_size,
                  Entries& e) {
  e.column.clear();
  e.log_p.clear();
  e.logit.clear();
  e.p_sum = 0;
  e.out_of_range = false;
  for (int64_t j = 0; j < k; ++j) {
    if (log_p[j] == kNegInf) continue;  // no entry
    const int64_t id = static_cast<int64_t>(ids[j]);
    if (id < 0 || id >= vocab_size) {
      e.out_of_range = true;
      continue;
    }
    e.column.push_back(id);
    e.log_p.push_back(log_p[j]);
    e.logit.push_back(static_cast<double>(load_as<acc_t>(s, id)));
    e.p_sum += std::exp(log_p[j]);
  }
  e.sorted = e.column;
  std::sort(e.sorted.begin(), e.sorted.end());
}

// The student's row statistics from pass 1 (or none: a row that is not streamed, renormalized without token
// statistics, counts the entries' columns only) and the gathered logits.
struct StudentStats {
  double c, log_z, c_r, log_z_r, entropy;

  double log_q(double logit, double k) const { return k * (logit - c) - log_z; }
  // log Q_R = lse_R - L, -inf where the student has no mass on R.
  double log_tail_mass(double k) const { return log_z_r == kNegInf ? kNegInf : k * (c_r - c) + log_z_r - log_z; }
};

// The renormalized mode's student side: the centre and log-normaliser of the entries' logits alone.
struct EntryNormaliser {
  double c, log_z;

  EntryNormaliser(const Entries& e, double k) {
    double top = kNegInf;
    for (double x : e.logit) top = std::max(top, x);
    c = top == kNegInf ? 0.0 : top;
    double z = 0;
    for (double x : e.logit) z += std::exp(k * (x - c));
    log_z = std::log(z);
  }
};

// log sum_I p, the renormalized mode's teacher normaliser.
double entries_log_mass(const Entries& e) {
  double top = kNegInf;
  for (double lp : e.log_p) top = std::max(top, lp);
  if (top == kNegInf) return kNegInf;
  double z = 0;
  for (double lp : e.log_p) z += std::exp(lp - top);
  return top + std::log(z);
}

// The row's log pi = log(P_R / (V - K')) of the uniform completion (-inf where R is empty).
double log_uniform_tail(const Entries& e, int64_t vocab_size) {
  const int64_t n_tail = vocab_size - e.n_live();
  return n_tail > 0 ? e.log_tail_mass(vocab_size) - std::log(double(n_tail)) : kNegInf;
}

// Calls f(student data, acc_t{}) with acc_t double if the student is float64 or double_acc, else float.
template <typename F>
void dispatch_student(const at::Tensor& student, bool double_acc, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), kWhere, [&] {
    if constexpr (std::is_same<scalar_t, double>::value) {
      f(student.data_ptr<scalar_t>(), double{});
    } else if (double_acc) {
      f(student.data_ptr<scalar_t>(), double{});
    } else {
      f(student.data_ptr<scalar_t>(), float{});
    }
  });
}

// Calls f(ids data) with the typed ids (int32 or int64).
template <typename F>
void dispatch_ids(const at::Tensor& ids, F&& f) {
  if (ids.scalar_type() == at::kInt) {
    f(ids.data_ptr<int32_t>());
  } else {
    f(ids.data_ptr<int64_t>());
  }
}

using logits_args::n_rows;
using logits_args::ptr_or_null;
using logits_args::row_stats_of;
using logits_args::row_strides;
using logits_args::row_vector;

}  // namespace
