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
// Pass 1 streams the row for both log-normalisers (online softmax: running maxima c_s, c_t of the raw logits and
// Z_s = sum exp(k (s - c_s)), Z_t likewise, re-centred when a maximum grows, double sums). Pass 2 evaluates each
// column from them:
//   log q_v = k (s_v - c_s) - log Z_s,   log p_v = k (t_v - c_t) - log Z_t,
//   delta_v = log p_v - log q_v = k ((t_v - c_t) - (s_v - c_s)) - (log Z_t - log Z_s)  (raw differences first),
// and, for a mixture m = w p + (1 - w) q (w, the teacher's weight: beta, alpha, or 1 - alpha for the skew reverse KL),
//   tail_v = log((1 - w') + w' exp(-|delta_v|)),  w' = w where delta <= 0, 1 - w above (fast_log, fast_exp),
//   log m - log q = max(delta, 0) + tail,   log p - log m = min(delta, 0) - tail
// (the log-sum-exp of log w + log p and log(1 - w) + log q, within a few ulps of 1 absolute, vectorised, and finite
// at delta = +-inf where its leading probability is positive); then adds the value's terms and sum_v q_v a_v, with
// a_v = dD/dq_v:
//   forward_kl: q a = -p;  jsd: (1 - beta) q log(q / m);  skew_forward_kl: -p (1 - alpha p / m);
//   skew_reverse_kl: q (log(q / m) + 1 - alpha q / m);  tvd: 1/2 q sign(q - p)  (0 at q = p).
// Given row statistics (a vocabulary shard's, standing for the whole vocabulary's: parallel.py) replace pass 1.
// The backward writes, in one pass, grad_v = g k (q_v a_v - q_v sum_u q_u a_u) (the softmax's chain rule).
//
// Dtypes and rows as in reverse_kld.cpp: each input read in its own dtype, per-element arithmetic in acc_t (double
// if either input is float64, else float), row sums in double, the gradient rounded to nearest even in the
// student's dtype; [n_outer, rows_per_outer, V] row views with any strides (csrc/common/row_strides.h).

#include "divergence.h"

#include "../common/logits_args.h"
#include "streaming.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

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

// A row's constants: the row statistics, log Z_t - log Z_s, k, and the divergence's coefficient and teacher weight.
template <typename acc_t>
struct Row {
  acc_t c_s, logz_s, c_t, logz_t, logz_gap, k, coefficient, teacher_weight;
};

template <typename acc_t>
Row<acc_t> row_of(Divergence divergence, double coefficient, double inv_t, double c_s, double logz_s, double c_t,
                  double logz_t) {
  // The teacher's weight w in the mixture m = w p + (1 - w) q.
  const double weight = divergence == Divergence::kSkewReverseKl ? 1 - coefficient : coefficient;
  return {acc_t(c_s), acc_t(logz_s), acc_t(c_t), acc_t(logz_t), acc_t(logz_t - logz_s), acc_t(inv_t),
          acc_t(coefficient), acc_t(weight)};
}

// One column's q_v, its term of D and q_v a_v (a_v = dD/dq_v), from the raw logits x (student) and y (teacher).
template <typename acc_t>
struct Column {
  acc_t q, value, partial;
};

// The mixture divergences' part of column (below): from q, p and delta = log p - log q.
template <Divergence D, typename acc_t>
C10_ALWAYS_INLINE Column<acc_t> mixture_column(const Row<acc_t>& r, acc_t q, acc_t p, bool q_live, bool p_live,
                                               acc_t delta) {
  // The mixture m = w p + (1 - w) q: log m - log q = max(delta, 0) + tail and log p - log m = min(delta, 0) - tail,
  // each finite where its leading probability is positive (delta = +-inf included).
  const acc_t weight = delta > 0 ? 1 - r.teacher_weight : r.teacher_weight;
  const acc_t tail = fast_log((1 - weight) + weight * fast_exp(-std::abs(delta)));
  const acc_t log_q_over_m = -(std::max(delta, acc_t(0)) + tail);
  const acc_t log_p_over_m = std::min(delta, acc_t(0)) - tail;
  if constexpr (D == Divergence::kJsd) {
    const acc_t beta = r.coefficient;
    const acc_t q_term = where_live(q_live, q * log_q_over_m);
    return {q, beta * where_live(p_live, p * log_p_over_m) + (1 - beta) * q_term, (1 - beta) * q_term};
  } else if constexpr (D == Divergence::kSkewForwardKl) {
    const acc_t p_over_m = fast_exp(log_p_over_m);
    return {q, where_live(p_live, p * log_p_over_m), where_live(p_live, -p * (1 - r.coefficient * p_over_m))};
  } else {
    const acc_t q_over_m = fast_exp(log_q_over_m);  // the skew reverse KL
    return {q, where_live(q_live, q * log_q_over_m),
            where_live(q_live, q * (log_q_over_m + 1 - r.coefficient * q_over_m))};
  }
}

template <Divergence D, typename acc_t>
C10_ALWAYS_INLINE Column<acc_t> column(const Row<acc_t>& r, acc_t x, acc_t y) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t u = x - r.c_s, w = y - r.c_t;
  const acc_t log_q = u * r.k - r.logz_s, log_p = w * r.k - r.logz_t;
  const acc_t q = fast_exp(log_q), p = fast_exp(log_p);
  const bool q_live = q > 0, p_live = p > 0;
  // log p - log q, from the raw differences where both are finite (+-inf where one model's logit is -inf).
  const acc_t delta = (x > kNegInf && y > kNegInf) ? (w - u) * r.k - r.logz_gap : log_p - log_q;
  if constexpr (D == Divergence::kForwardKl) {
    return {q, where_live(p_live, p * delta), -p};
  } else if constexpr (D == Divergence::kTvd) {
    const acc_t sign = acc_t(q > p) - acc_t(q < p);
    return {q, acc_t(0.5) * std::abs(p - q), acc_t(0.5) * q * sign};
  } else {
    return mixture_column<D>(r, q, p, q_live, p_live, delta);
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
  acc_t m_s = -std::numeric_limits<acc_t>::infinity(), m_t = m_s;  // running maxima
  acc_t c_s = 0, c_t = 0;                                           // centres
  double z_s = 0, z_t = 0;
  for (int64_t start = 0; start < n_cols; start += kChunk) {
    const int64_t n = std::min(kChunk, n_cols - start);
    acc_t bm_s, bm_t;
    const acc_t* x = chunk_values(s + start, n, buf_s, bm_s);
    const acc_t* y = chunk_values(t + start, n, buf_t, bm_t);
    m_s = std::max(m_s, bm_s);
    m_t = std::max(m_t, bm_t);
    const acc_t nc_s = centre_of(m_s), nc_t = centre_of(m_t);
    if (nc_s != c_s && z_s > 0) z_s *= std::exp((double(c_s) - double(nc_s)) * inv_t);
    if (nc_t != c_t && z_t > 0) z_t *= std::exp((double(c_t) - double(nc_t)) * inv_t);
    c_s = nc_s;
    c_t = nc_t;
    double chunk_z_s = 0, chunk_z_t = 0;
#pragma omp simd reduction(+ : chunk_z_s, chunk_z_t)
    for (int64_t j = 0; j < n; ++j) {
      chunk_z_s += fast_exp((x[j] - c_s) * k);
      chunk_z_t += fast_exp((y[j] - c_t) * k);
    }
    z_s += chunk_z_s;
    z_t += chunk_z_t;
  }
  return {double(c_s), std::log(z_s), double(c_t), std::log(z_t)};
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
          // Pass 1, unless the caller gives the statistics (a sharded vocabulary's global log-normalisers).
          const LogNormalisers z = given_p != nullptr
              ? LogNormalisers{double(given_p[4 * i]), double(given_p[4 * i + 1]), double(given_p[4 * i + 2]),
                               double(given_p[4 * i + 3])}
              : log_normalisers<student_t, teacher_t, acc_t>(s, t, vocab_size, inv_temperature, buf_s, buf_t);
          const Row<acc_t> r = row_of<acc_t>(kind, coefficient, inv_temperature, z.c_s, z.logz_s, z.c_t, z.logz_t);
          double total = 0, partial = 0;
  #pragma omp simd reduction(+ : total, partial)
          for (int64_t v = 0; v < vocab_size; ++v) {
            const Column<acc_t> c = column<D>(r, load_as<acc_t>(s, v), load_as<acc_t>(t, v));
            total += c.value;
            partial += c.partial;
          }
          // NaN logits make a log-normaliser NaN, and every q_v, p_v with it: the terms alone would drop them.
          const double nan_of_logits = (z.logz_s - z.logz_s) + (z.logz_t - z.logz_t);
          value_p[i] = static_cast<acc_t>(total + nan_of_logits);
          partial_p[i] = static_cast<acc_t>(partial + nan_of_logits);
          st[0] = r.c_s;
          st[1] = r.logz_s;
          st[2] = r.c_t;
          st[3] = r.logz_t;
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
