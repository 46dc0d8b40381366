// Fused CPU kernels of the divergence family: D(p, q) per row and its gradient with respect to the student logits.
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
// KL; w and 1 - w Factors too), the log-ratios log(p / m) and log(q / m) are fast_log of the ratios (within a few u
// absolute; finite wherever the leading probability is positive, -log w where the other model's is 0). The forward
// KL's p_v (log p_v - log q_v) is p_v k ((t_v - c_t) - (s_v - c_s)) from the raw differences, its row constant
// -(log Z_t - log Z_s) sum_v p_v added once per row, in double. Then pass 2 adds the value's terms and sum_v q_v a_v,
// with
// a_v = dD/dq_v:
//   forward_kl: q a = -p;  jsd: (1 - beta) q log(q / m);  skew_forward_kl: -p (1 - alpha p / m);
//   skew_reverse_kl: q (log(q / m) + 1 - alpha q / m);  tvd: 1/2 q sign(q - p)  (0 at q = p).
// Given row statistics (a vocabulary shard's, standing for the whole vocabulary's: parallel.py) replace pass 1 (and
// the forward KL's single pass: the shard's terms are pass 2's).
// The backward writes, in one pass, grad_v = g k (q_v a_v - q_v sum_u q_u a_u) (the softmax's chain rule).
//
// Dtypes and rows as in reverse_kld.cpp: each input read in its own dtype, per-element arithmetic in acc_t (double
// if either input is float64, else float), row sums in double, the gradient rounded to nearest even in the
// student's dtype; [n_outer, rows_per_outer, V] row views with any strides (csrc/common/row_strides.h).

#include "divergence.h"

#include "../common/logits_args.h"
#include "kl_row.h"
#include "row_factor.h"
#include "streaming.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include <ATen/Parallel.h>

namespace {

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
// and 1 - w.
template <typename acc_t>
struct Row {
  acc_t c_s, c_t;
  Factor<acc_t> inv_z_s, inv_z_t;
  acc_t k, coefficient;
  Factor<acc_t> teacher_weight, student_weight;
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
          Factor<acc_t>::of(1 - weight)};
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
    const acc_t p_term = where_live(p_live, p * fast_log(p / m));
    const acc_t q_term = where_live(q_live, q * fast_log(q / m));
    return {q, beta * p_term + one_minus_beta * q_term, one_minus_beta * q_term};
  } else if constexpr (D == Divergence::kSkewForwardKl) {
    const acc_t p_over_m = p / m;  // <= 1 / alpha
    return {q, where_live(p_live, p * fast_log(p_over_m)), where_live(p_live, -p * (1 - r.coefficient * p_over_m))};
  } else {
    const acc_t q_over_m = q / m;  // the skew reverse KL; <= 1 / alpha
    return {q, where_live(q_live, q * fast_log(q_over_m)),
            where_live(q_live, q * (fast_log(q_over_m) + 1 - r.coefficient * q_over_m))};
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

using logits_args::accumulation_dtype;
using logits_args::check_logits;
using logits_args::divergence_of;
using logits_args::n_rows;
using logits_args::ptr_or_null;
using logits_args::row_stats_of;
using logits_args::row_strides;
using logits_args::row_vector;

}  // namespace

std::vector<at::Tensor> divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size,
    const c10::optional<at::Tensor>& given_row_stats) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CPU, kWhere);
  const Divergence kind = divergence_of(divergence, coefficient, kWhere);
  const int64_t n = n_rows(student);
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, student.device(), "mask", kWhere);
  const auto opts = student.options().dtype(accumulation_dtype(student, teacher));
  const at::Tensor given_c = given_row_stats.has_value() && given_row_stats->defined()
      ? row_stats_of(*given_row_stats, n, accumulation_dtype(student, teacher), student.device(), kWhere)
      : at::Tensor();
  at::Tensor value = at::empty({n}, opts);
  at::Tensor mean_partial = at::empty({n}, opts);
  at::Tensor row_stats = at::empty({n, 4}, opts);

  dispatch_logits_pair(student, teacher, [&](const auto* s_base, const auto* t_base) {
    using student_t = ElementOf<decltype(s_base)>;
    using teacher_t = ElementOf<decltype(t_base)>;
    using acc_t = AccOf<student_t, teacher_t>;
    const minillm::RowStrides s_rows = row_strides(student), t_rows = row_strides(teacher);
    const bool* msk = ptr_or_null<bool>(mask_c);
    acc_t* value_p = value.data_ptr<acc_t>();
    acc_t* partial_p = mean_partial.data_ptr<acc_t>();
    acc_t* stats_p = row_stats.data_ptr<acc_t>();
    const acc_t* given_p = ptr_or_null<acc_t>(given_c);

    with_divergence(kind, [&](auto tag) {
      constexpr Divergence D = decltype(tag)::value;
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
            const Row<acc_t> r = row_of<acc_t>(kind, coefficient, inv_temperature, z.c_s, z.logz_s, z.c_t, z.logz_t);
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
  });
  return {value, mean_partial, row_stats};
}

at::Tensor divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_divergence, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CPU, kWhere);
  const Divergence kind = divergence_of(divergence, coefficient, kWhere);
  const int64_t n = n_rows(student);
  const int64_t width = student.size(2);
  const at::Device device = student.device();
  const at::ScalarType acc = accumulation_dtype(student, teacher);
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, device, "mask", kWhere);
  const at::Tensor grad_c = row_vector(grad_divergence, n, acc, device, "grad_divergence", kWhere);
  const at::Tensor partial_c = row_vector(mean_partial, n, acc, device, "mean_partial", kWhere);
  TORCH_CHECK(grad_c.defined() && partial_c.defined(), kWhere, ": grad_divergence and mean_partial are required");
  const at::Tensor stats_c = row_stats_of(row_stats, n, acc, device, kWhere);
  at::Tensor grad = at::empty({n, width}, student.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad);

  dispatch_logits_pair(student, teacher, [&](const auto* s_base, const auto* t_base) {
    using student_t = ElementOf<decltype(s_base)>;
    using teacher_t = ElementOf<decltype(t_base)>;
    using acc_t = AccOf<student_t, teacher_t>;
    const minillm::RowStrides s_rows = row_strides(student), t_rows = row_strides(teacher);
    student_t* g_base = grad.data_ptr<student_t>();
    const bool* msk = ptr_or_null<bool>(mask_c);
    const acc_t* grad_p = grad_c.data_ptr<acc_t>();
    const acc_t* partial_p = partial_c.data_ptr<acc_t>();
    const acc_t* stats_p = stats_c.data_ptr<acc_t>();

    with_divergence(kind, [&](auto tag) {
      constexpr Divergence D = decltype(tag)::value;
      at::parallel_for(0, n, grain_rows(width), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          student_t* out = g_base + i * width;
          if (msk != nullptr && !msk[i]) {
            std::memset(static_cast<void*>(out), 0, sizeof(student_t) * width);
            continue;
          }
          const student_t* s = s_base + s_rows.offset(i);
          const teacher_t* t = t_base + t_rows.offset(i);
          const acc_t* st = stats_p + 4 * i;
          const Row<acc_t> r = row_of<acc_t>(kind, coefficient, inv_temperature, st[0], st[1], st[2], st[3]);
          const acc_t scale = grad_p[i] * r.k, mean = partial_p[i];
  #pragma omp simd
          for (int64_t v = 0; v < vocab_size; ++v) {
            const Column<acc_t> c = column<D>(r, load_as<acc_t>(s, v), load_as<acc_t>(t, v));
            store_rounded(out, v, scale * (c.partial - c.q * mean));
          }
          if (width > vocab_size) {
            std::memset(static_cast<void*>(out + vocab_size), 0, sizeof(student_t) * (width - vocab_size));
          }
        }
      });
    });
  });
  return grad;
}
