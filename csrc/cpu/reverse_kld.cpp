// Fused reverse-KL CPU kernels.
//
// Per row (token), over the first vocab_size columns of the student logits s and the teacher logits t, with
// inverse temperature k = 1/T: the forward pass streams the row in chunks that stay in L1. Per chunk it takes
// the chunk's maxima of the raw logits, re-centres the running sums when a maximum grows (online softmax),
// then accumulates, with c_s, c_t the running maxima and u_v = s_v - c_s, w_v = t_v - c_t (raw differences),
//   Z_s = sum_v e_v,  e_v = exp(k u_v)          Z_t = sum_v exp(k w_v)
//   E   = sum_v e_v u_v                          A   = sum_v e_v (u_v - w_v)
// (terms with e_v == 0 count 0, so -inf columns never give NaN), from which
//   KL(q || p) = k A / Z_s - log Z_s + log Z_t,         H(q) = log Z_s - k E / Z_s,
//   log q(y) = k (s_y - c_s) - log Z_s,                 log p(y) = k (t_y - c_t) - log Z_t.
// Centring on the raw maxima (k u_v rather than k s_v - k c_s) makes the largest term exactly exp(0) = 1 and
// every exponent <= 0 whatever the scale: a scaled logit recomputed with another rounding than the maximum
// (x k rounded, then an FMA-contracted x k - max) could land above 0 and overflow the sums at |s k| ~ 1e10 in
// float32. The raw differences u_v, w_v enter E and A unscaled (k is applied once per row, in double), so a
// row dominated by one column keeps full accuracy at any |logits|.
// The backward pass recomputes log q_v = k u_v - log Z_s and log p_v = k w_v - log Z_t from the row
// statistics (c_s, log Z_s, c_t, log Z_t) and writes, in one pass,
//   grad_v = k ([q_v > 0] q_v (a (log q_v - log p_v - KL) - b - c (log q_v + H)) + b [v == y]).
//
// Dtypes: student and teacher may differ (any of float32, float64, bfloat16, float16); each is read in its
// own dtype. Per-element arithmetic (the exps, the terms) is in acc_t: double if either input is float64,
// float otherwise. The row sums Z_s, Z_t, E, A are double in both cases, added to a pair of terms at a time
// (accumulate_chunk): float sums round at the scale of their largest term, so over a row they cost up to 1e-6
// relative in KL (the cancellation in KL = k A / Z_s - log Z_s + log Z_t at V = 32000, or a peaked row's few
// large terms).
// Per-row outputs are acc_t; the gradient has the student's dtype (rounded to nearest even).
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
#include "streaming.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <ATen/Parallel.h>

namespace {

using namespace minillm_cpu;  // NOLINT(build/namespaces): the shared per-element helpers

// ---------------------------------------------------------------------------------------------------------
// Forward, one row.
// ---------------------------------------------------------------------------------------------------------
// The row sums, centred on (c_s, c_t): Z_s, Z_t, E, A of the header (raw differences, double).
struct RowSums {
  double z_s = 0, z_t = 0, e = 0, a = 0;
};

// The terms of one column in acc_t: e_v = exp(k u_v), exp(k w_v), e_v u_v and e_v (u_v - w_v) (0 where e_v = 0).
template <typename acc_t>
struct ColumnTerms {
  acc_t z_s, z_t, e, a;
};

template <typename acc_t>
C10_ALWAYS_INLINE ColumnTerms<acc_t> column_terms(acc_t x, acc_t y, acc_t c_s, acc_t c_t, acc_t k) {
  const acc_t u = x - c_s;  // <= 0: the centre is the maximum
  const acc_t w = y - c_t;
  const acc_t e = fast_exp(u * k);
  const bool live = e > 0;
  return {e, fast_exp(w * k), where_live(live, e * u), where_live(live, e * (u - w))};
}

// Adds n columns (values x of the student, y of the teacher, in acc_t) at the centres c_s, c_t into the double
// row sums. A float sum would round at the scale of its largest term (1, for the row's maximum): summed over a
// chunk, that cost up to 5e-7 relative in Z_s on a peaked row. Here the terms of columns j and j + n/2 are
// added in acc_t (one rounding, at the scale of the pair) and the pair in double: as accurate as a double
// sum of the terms, with half the conversions (the loop runs ~20% faster than converting every term).
template <typename acc_t>
void accumulate_chunk(const acc_t* __restrict x, const acc_t* __restrict y, int64_t n, acc_t c_s, acc_t c_t,
                      acc_t k, RowSums& sums) {
  const int64_t half = n / 2;
  double z_s = 0, z_t = 0, e_sum = 0, a_sum = 0;
#pragma omp simd reduction(+ : z_s, z_t, e_sum, a_sum)
  for (int64_t j = 0; j < half; ++j) {
    const ColumnTerms<acc_t> p = column_terms(x[j], y[j], c_s, c_t, k);
    const ColumnTerms<acc_t> q = column_terms(x[j + half], y[j + half], c_s, c_t, k);
    z_s += p.z_s + q.z_s;
    z_t += p.z_t + q.z_t;
    e_sum += p.e + q.e;
    a_sum += p.a + q.a;
  }
  if (n % 2 != 0) {
    const ColumnTerms<acc_t> p = column_terms(x[n - 1], y[n - 1], c_s, c_t, k);
    z_s += p.z_s;
    z_t += p.z_t;
    e_sum += p.e;
    a_sum += p.a;
  }
  sums.z_s += z_s;
  sums.z_t += z_t;
  sums.e += e_sum;
  sums.a += a_sum;
}

// Per-row results (double) and the centres the backward needs.
struct RowStats {
  double c_s, logz_s, c_t, logz_t, kl, entropy;
};

template <typename student_t, typename teacher_t, typename acc_t>
RowStats forward_row(const student_t* __restrict s, const teacher_t* __restrict t, int64_t n_cols, double inv_t,
                     acc_t* __restrict buf_s, acc_t* __restrict buf_t) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t k = static_cast<acc_t>(inv_t);
  acc_t m_s = kNegInf, m_t = kNegInf;  // running maxima
  acc_t c_s = 0, c_t = 0;              // centres
  RowSums sums;
  for (int64_t start = 0; start < n_cols; start += kChunk) {
    const int64_t n = std::min(kChunk, n_cols - start);
    // Pass 1: chunk maxima (and the chunks in acc_t).
    acc_t bm_s, bm_t;
    const acc_t* x = chunk_values(s + start, n, buf_s, bm_s);
    const acc_t* y = chunk_values(t + start, n, buf_t, bm_t);

    // Re-centre the sums on the new maxima (in double: the centres' difference is exact there).
    m_s = std::max(m_s, bm_s);
    m_t = std::max(m_t, bm_t);
    const acc_t nc_s = centre_of(m_s), nc_t = centre_of(m_t);
    if (nc_t != c_t) {
      // w -> w + d with d = c_t - nc_t: A loses d Z_s.
      const double d = double(c_t) - double(nc_t);
      if (sums.z_t > 0) sums.z_t *= std::exp(d * inv_t);
      if (sums.z_s > 0) sums.a -= d * sums.z_s;
      c_t = nc_t;
    }
    if (nc_s != c_s) {
      // u -> u + d with d = c_s - nc_s, and e_v -> r e_v with r = exp(k d).
      if (sums.z_s > 0) {
        const double d = double(c_s) - double(nc_s);
        const double r = std::exp(d * inv_t);
        if (r > 0) {
          sums.e = r * (sums.e + d * sums.z_s);
          sums.a = r * (sums.a + d * sums.z_s);
          sums.z_s *= r;
        } else {
          sums.z_s = sums.e = sums.a = 0;
        }
      }
      c_s = nc_s;
    }

    // Pass 2: accumulate.
    accumulate_chunk<acc_t>(x, y, n, c_s, c_t, k, sums);
  }
  RowStats out;
  out.c_s = c_s;
  out.c_t = c_t;
  out.logz_s = std::log(sums.z_s);
  out.logz_t = std::log(sums.z_t);
  out.kl = inv_t * sums.a / sums.z_s - out.logz_s + out.logz_t;
  out.entropy = out.logz_s - inv_t * sums.e / sums.z_s;
  return out;
}

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
        const RowStats r = forward_row<student_t, teacher_t, acc_t>(s, t, vocab_size, inv_temperature, buf_s, buf_t);
        kl_p[i] = static_cast<acc_t>(r.kl);
        ent_p[i] = static_cast<acc_t>(r.entropy);
        st[0] = static_cast<acc_t>(r.c_s);
        st[1] = static_cast<acc_t>(r.logz_s);
        st[2] = static_cast<acc_t>(r.c_t);
        st[3] = static_cast<acc_t>(r.logz_t);
        if (tgt == nullptr) {
          slp_p[i] = tlp_p[i] = 0;
        } else if (tgt[i] >= 0 && tgt[i] < vocab_size) {
          const int64_t y = tgt[i];
          slp_p[i] = static_cast<acc_t>((double(widen(s, y)) - r.c_s) * inv_temperature - r.logz_s);
          tlp_p[i] = static_cast<acc_t>((double(widen(t, y)) - r.c_t) * inv_temperature - r.logz_t);
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
