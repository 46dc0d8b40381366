// The CPU kernels of the divergence family, D(p, q) per row (divergence_forward_rows.h: a unit per divergence) and
// its gradient with respect to the student logits (divergence_backward.cpp): what the units share, the per-column
// formulas below.
//
// Per row, over the first vocab_size columns, with k = 1/T, q = softmax(k s), p = softmax(k t):
//   forward_kl        KL(p || q) = sum_v p_v (log p_v - log q_v)
//   jsd               beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q
//   skew_forward_kl   KL(p || m),   m = alpha p + (1 - alpha) q
//   skew_reverse_kl   KL(q || m),   m = alpha q + (1 - alpha) p
//   tvd               1/2 sum_v |p_v - q_v|
// (the reverse KL has its own single-pass kernel, reverse_kld.cpp). Terms whose leading probability is 0 count 0.
//
// The forward KL is one streaming pass, kl_row.h's with the models' roles swapped (a = t, b = s: KL(p || q), both
// log-normalisers; its sum_v q_v a_v = -sum_v p_v = -1). The others take two. Pass 1 streams the row for both
// log-normalisers (streaming.h's online log-normaliser: running maxima c_s, c_t of the raw logits and
// Z_s = sum exp(k (s - c_s)), Z_t likewise, re-centred when a maximum grows, double sums). Pass 2 evaluates each
// column from them:
//   q_v = exp(k (s_v - c_s)) / Z_s,   p_v = exp(k (t_v - c_t)) / Z_t,
// each 1 / Z a per-row Factor (row_factor.h: a pair of floats hi + lo, its product with a column rounded once, with no
// reliance on the compiler contracting it into an FMA; a float log Z subtracted in the exponent instead would shift
// every column by the same rounding, up to half an ulp of log Z: 4.8e-7 relative at V = 32000, the whole result off by
// as much). For a mixture m = w p + (1 - w) q (w, the teacher's weight: beta, alpha, or 1 - alpha for the skew reverse
// KL; w and 1 - w Factors too), the log-ratios log(p / m) and log(q / m) are fast_log of the ratios, or, where the
// leading model's own share of m dominates, -log w - log1p(...) from the row's log w (log_ratio_to_mixture; within a
// few u of the result; finite wherever the leading probability is positive, -log w where the other model's is 0).
// The forward KL's p_v (log p_v - log q_v) is p_v k ((t_v - c_t) - (s_v - c_s)) from the raw differences, its row
// constant -(log Z_t - log Z_s) sum_v p_v added once per row, in double. Then pass 2 adds the value's terms and
// sum_v q_v a_v, with a_v = dD/dq_v:
//   forward_kl: q a = -p;  jsd: (1 - beta) q log(q / m);  skew_forward_kl: -p (1 - alpha p / m);
//   skew_reverse_kl: q (log(q / m) + 1 - alpha q / m);  tvd: 1/2 q sign(q - p)  (0 at q = p).
// Given row statistics (a vocabulary shard's, standing for the whole vocabulary's: parallel.py) replace pass 1 (and
// the forward KL's single pass: the shard's terms are pass 2's).
// The backward writes, in one pass, grad_v = g k (q_v a_v - q_v sum_u q_u a_u) (the softmax's chain rule).
//
// Dtypes and rows as in reverse_kld.cpp: each input read in its own dtype, per-element arithmetic in acc_t (double
// if either input is float64, else float), row sums in double, the gradient rounded to nearest even in the
// student's dtype; [n_outer, rows_per_outer, V] row views with any strides (csrc/common/row_strides.h).
//
// Private to the family's units: the definitions have internal linkage (an unnamed namespace), as when the family was
// one unit, so each unit compiles its own copy, and a change built into one unit only (scripts/mutations.py's
// built_in) is not swapped for another unit's copy by the linker.
#pragma once

#include "../common/divergence_kind.h"
#include "../common/logits_args.h"
#include "row_factor.h"
#include "streaming.h"

#include <cmath>
#include <type_traits>

#include <c10/macros/Macros.h>

namespace {  // NOLINT(build/namespaces_headers): private to the family's units (above)

using namespace minillm_cpu;  // NOLINT(build/namespaces): the shared per-element helpers

using Divergence = minillm::DivergenceKind;

constexpr const char* kWhere = "divergence (cpu)";

// Calls f(std::integral_constant<Divergence, kind>{}): one instance of the row loops per divergence, so that the
// per-column code has no branch on the divergence (the loops vectorise where the divergence's functions allow).
template <typename F>
void with_divergence(Divergence kind, F&& f) {
  switch (kind) {
    case Divergence::kForwardKl: return f(std::integral_constant<Divergence, Divergence::kForwardKl>{});
    case Divergence::kJsd: return f(std::integral_constant<Divergence, Divergence::kJsd>{});
    case Divergence::kSkewForwardKl: return f(std::integral_constant<Divergence, Divergence::kSkewForwardKl>{});
    case Divergence::kSkewReverseKl: return f(std::integral_constant<Divergence, Divergence::kSkewReverseKl>{});
    case Divergence::kTvd: return f(std::integral_constant<Divergence, Divergence::kTvd>{});
  }
}

// A row's constants: the centres, 1 / Z_s and 1 / Z_t, k, the divergence's coefficient, and the mixture's weights w
// and 1 - w, their logs and the odds (1 - w) / w and w / (1 - w) (log_ratio_to_mixture).
template <typename acc_t>
struct Row {
  acc_t c_s, c_t;
  Factor<acc_t> inv_z_s, inv_z_t;
  acc_t k, coefficient;
  Factor<acc_t> teacher_weight, student_weight;
  Factor<acc_t> log_teacher_weight, log_student_weight, student_odds, teacher_odds;
};

template <typename acc_t>
Row<acc_t> row_of(Divergence divergence, double coefficient, double inv_t, double c_s, double logz_s, double c_t,
                  double logz_t) {
  // The teacher's weight w in the mixture m = w p + (1 - w) q.
  const double weight = divergence == Divergence::kSkewReverseKl ? 1 - coefficient : coefficient;
  return {acc_t(c_s),
          acc_t(c_t),
          Factor<acc_t>::of(std::exp(-logz_s)),
          Factor<acc_t>::of(std::exp(-logz_t)),
          acc_t(inv_t),
          acc_t(coefficient),
          Factor<acc_t>::of(weight),
          Factor<acc_t>::of(1 - weight),
          Factor<acc_t>::of(std::log(weight)),
          Factor<acc_t>::of(std::log1p(-weight)),
          Factor<acc_t>::of((1 - weight) / weight),
          Factor<acc_t>::of(weight / (1 - weight))};
}

// log(a / m) for a mixture m = w_a a + w_b b of two probabilities, given a / m, b / a, log w_a and the odds w_b / w_a:
// with z = (w_b / w_a) (b / a), a / m = 1 / (w_a (1 + z)), so
//   log(a / m) = -(log w_a + log1p(z))   where z < 1 (a's own share of m dominates: a / m near 1 / w_a),
//              = log(a / m)              elsewhere,
// log1p(z) = log(u) z / (u - 1), u = 1 + z (Kahan; z where u rounds to 1). The first form's log w_a is the row's, a
// pair hi + lo, and so are the odds: the log of a float ratio a / m near 1 / w_a errs by half an ulp of the ratio,
// which is 5e-7 of log(1 / 0.9) = 0.105 (a skew KL at alpha = 0.9 where the models are far apart: most of the row's
// value), and a single float log w_a or odds would shift every column alike where log w_a + log1p(z) cancels (a
// student near its teacher: 7e-7 of a JSD near 0.01). Both forms take one fast_log. A lane with a = 0 is masked by the
// caller.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t log_ratio_to_mixture(acc_t a_over_m, acc_t b_over_a, const Factor<acc_t>& log_weight,
                                             const Factor<acc_t>& odds) {
  const acc_t z = odds.times(b_over_a);
  const acc_t u = 1 + z;
  const bool own_share = z < 1;
  const acc_t log_arg = fast_log(own_share ? u : a_over_m);
  const acc_t log1p_z = u == 1 ? z : log_arg * (z / (u - 1));
  return own_share ? -((log_weight.hi + log1p_z) + log_weight.lo) : log_arg;
}

// One column's q_v, its term of D and q_v a_v (a_v = dD/dq_v), from the raw logits x (student) and y (teacher). The
// forward KL's term leaves out -p_v (log Z_t - log Z_s), which the row adds once, in double.
template <typename acc_t>
struct Column {
  acc_t q, value, partial;
};

// The mixture divergences' part of column (below), from q and p (each masked where its probability is 0).
template <Divergence D, typename acc_t>
C10_ALWAYS_INLINE Column<acc_t> mixture_column(const Row<acc_t>& r, acc_t q, acc_t p, bool q_live, bool p_live) {
  const acc_t m = r.teacher_weight.times(p) + r.student_weight.times(q);
  if constexpr (D == Divergence::kJsd) {
    const acc_t beta = r.teacher_weight.hi, one_minus_beta = r.student_weight.hi;
    const acc_t p_term = where_live(p_live, p * log_ratio_to_mixture(p / m, q / p, r.log_teacher_weight,
                                                                      r.student_odds));
    const acc_t q_term = where_live(q_live, q * log_ratio_to_mixture(q / m, p / q, r.log_student_weight,
                                                                      r.teacher_odds));
    return {q, beta * p_term + one_minus_beta * q_term, one_minus_beta * q_term};
  } else if constexpr (D == Divergence::kSkewForwardKl) {
    const acc_t p_over_m = p / m;  // <= 1 / alpha
    const acc_t log_p_over_m = log_ratio_to_mixture(p_over_m, q / p, r.log_teacher_weight, r.student_odds);
    return {q, where_live(p_live, p * log_p_over_m), where_live(p_live, -p * (1 - r.coefficient * p_over_m))};
  } else {
    const acc_t q_over_m = q / m;  // the skew reverse KL; <= 1 / alpha
    const acc_t log_q_over_m = log_ratio_to_mixture(q_over_m, p / q, r.log_student_weight, r.teacher_odds);
    return {q, where_live(q_live, q * log_q_over_m),
            where_live(q_live, q * (log_q_over_m + 1 - r.coefficient * q_over_m))};
  }
}

template <Divergence D, typename acc_t>
C10_ALWAYS_INLINE Column<acc_t> column(const Row<acc_t>& r, acc_t x, acc_t y) {
  const acc_t u = x - r.c_s, w = y - r.c_t;
  const acc_t q = r.inv_z_s.times(fast_exp(u * r.k)), p = r.inv_z_t.times(fast_exp(w * r.k));
  const bool q_live = q > 0, p_live = p > 0;
  if constexpr (D == Divergence::kForwardKl) {
    // p (log p - log q + log Z_t - log Z_s) from the raw differences (+inf where only the student's logit is -inf).
    return {q, where_live(p_live, p * ((w - u) * r.k)), -p};
  } else if constexpr (D == Divergence::kTvd) {
    const acc_t sign = acc_t(q > p) - acc_t(q < p);
    return {q, acc_t(0.5) * std::abs(p - q), acc_t(0.5) * q * sign};
  } else {
    return mixture_column<D>(r, q, p, q_live, p_live);
  }
}

using logits_args::accumulation_dtype;
using logits_args::check_logits;
using logits_args::divergence_of;
using logits_args::n_rows;
using logits_args::ptr_or_null;
using logits_args::row_stats_of;
using logits_args::row_strides;
using logits_args::row_vector;

}  // namespace
