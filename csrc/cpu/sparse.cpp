// Fused CPU kernels of the sparse teacher: D(p, q) per row of the student q = softmax(k s) (k = 1/T, the first
// vocab_size = V columns) from a teacher given as K (id, log p) pairs, its tail completed by the tail mode, and the
// gradient with respect to the student logits. docs/design.md ("The sparse teacher") has the math and the proofs.
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
// Dtypes and rows as in divergence.cpp: the student read in its own dtype (the log-probabilities are read once per
// row into double, the ids into int64), the gradient rounded to nearest even in the student's dtype;
// [n_outer, rows_per_outer, V] row views with any strides (csrc/common/row_strides.h). Masked rows are not read.
// A live id outside [0, V) makes its row NaN (what a torch.compile graph, where the eager check cannot run, gets);
// nothing is read outside the row.

#include "sparse.h"

#include "../common/sparse_args.h"
#include "streaming.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

namespace {

using namespace minillm_cpu;  // NOLINT(build/namespaces): the shared per-element helpers

using minillm::SparseDivergence;
using minillm::SparseTail;

constexpr const char* kWhere = "sparse_divergence (cpu)";
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <SparseDivergence D>
using DivergenceTag = std::integral_constant<SparseDivergence, D>;
template <SparseTail T>
using TailTag = std::integral_constant<SparseTail, T>;

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

// f(tail tag, divergence tag) for the per-column loops: only "uniform" evaluates the divergence column by column
// (bin's tail columns share one outcome, renormalized's have none), so the others get one instance each.
template <typename F>
void with_column_mode(SparseTail tail, SparseDivergence divergence, F&& f) {
  switch (tail) {
    case SparseTail::kBin: return f(TailTag<SparseTail::kBin>{}, DivergenceTag<SparseDivergence::kReverseKl>{});
    case SparseTail::kRenormalized:
      return f(TailTag<SparseTail::kRenormalized>{}, DivergenceTag<SparseDivergence::kReverseKl>{});
    case SparseTail::kUniform:
      return with_divergence(divergence, [&](auto d) { f(TailTag<SparseTail::kUniform>{}, d); });
  }
}

// One outcome's term of D and q a (a = dD/dq), from its log-probabilities under the teacher (log p) and the student
// (log q): the table of docs/design.md, a term whose leading probability is 0 counting 0. The mixtures' logarithms
// as in divergence.cpp: with delta = log p - log q and m = w p + (1 - w) q,
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

// Columns [start, start + n) of the row in acc_t, into buf, with -inf at the columns of I (the sorted columns from
// next on; next is advanced past them) and keep[j] = 0 there, 1 elsewhere.
template <typename acc_t, typename student_t>
void chunk_without_entries(const student_t* __restrict s, int64_t start, int64_t n, const std::vector<int64_t>& sorted,
                           size_t& next, acc_t* __restrict buf, uint8_t* __restrict keep) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    buf[j] = load_as<acc_t>(s + start, j);
    keep[j] = 1;
  }
  for (; next < sorted.size() && sorted[next] < start + n; ++next) {
    buf[sorted[next] - start] = -std::numeric_limits<acc_t>::infinity();
    keep[sorted[next] - start] = 0;
  }
}

// Pass 1 over R: the running maximum m_R and, centred on c_R = centre_of(m_R), Z_R and E_R.
struct TailSums {
  double m_r = kNegInf, z_r = 0, e_r = 0;
};

template <typename acc_t, typename student_t>
TailSums tail_sums(const student_t* __restrict s, int64_t vocab_size, double inv_t, const Entries& e,
                   acc_t* __restrict buf, uint8_t* __restrict keep) {
  const acc_t k = static_cast<acc_t>(inv_t);
  OnlineLogNormaliser<acc_t> tail;
  double sum_e = 0;
  size_t next = 0;
  for (int64_t start = 0; start < vocab_size; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab_size - start);
    chunk_without_entries(s, start, n, e.sorted, next, buf, keep);
    acc_t chunk_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : chunk_max)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = buf[j];  // NaN ignored: it reaches the sums through exp
      chunk_max = std::max(chunk_max, v);
    }
    // Re-centre: e_v -> f e_v and (s_v - c) -> (s_v - c) + d take E_R to f E_R + d Z_R (Z_R already rescaled).
    const Recentring move = tail.recentre(chunk_max, inv_t);
    sum_e = move.factor * sum_e + move.shift * tail.z;
    const acc_t c = tail.centre;
    double chunk_z = 0, chunk_e = 0;
#pragma omp simd reduction(+ : chunk_z, chunk_e)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t u = buf[j] - c;
      const acc_t ev = fast_exp(u * k);
      chunk_z += ev;
      chunk_e += where_live(ev > 0, ev * u);
    }
    tail.z += chunk_z;
    sum_e += chunk_e;
  }
  return {double(tail.running_max), tail.z, sum_e};
}

// The student's row statistics from pass 1 (or none: a row that is not streamed, renormalized without token
// statistics, counts the entries' columns only) and the gathered logits.
struct StudentStats {
  double c, log_z, c_r, log_z_r, entropy;

  double log_q(double logit, double k) const { return k * (logit - c) - log_z; }
  // log Q_R = lse_R - L, -inf where the student has no mass on R.
  double log_tail_mass(double k) const { return log_z_r == kNegInf ? kNegInf : k * (c_r - c) + log_z_r - log_z; }
};

StudentStats student_stats(const TailSums& tail, const Entries& e, double k) {
  const double c_r = tail.m_r == kNegInf ? 0.0 : tail.m_r;
  double top = tail.m_r;
  for (double x : e.logit) top = std::max(top, x);  // (NaN ignored, as in the sums' maxima)
  const double c = top == kNegInf ? 0.0 : top;
  double z = 0, sum_e = 0;
  if (tail.z_r > 0) {
    const double r = std::exp(k * (c_r - c));
    z = r * tail.z_r;
    sum_e = r * (tail.e_r + (c_r - c) * tail.z_r);
  } else if (std::isnan(tail.z_r)) {
    z = sum_e = kNaN;
  }
  for (double x : e.logit) {
    const double ev = std::exp(k * (x - c));
    z += ev;
    sum_e += ev > 0 ? ev * (x - c) : 0.0;
  }
  const double log_z = std::log(z);
  return {c, log_z, c_r, std::log(tail.z_r), log_z - k * sum_e / z};
}

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

double nan_of(double x) { return x - x; }  // 0, or NaN for NaN (and inf)

// The row's log pi = log(P_R / (V - K')) of the uniform completion (-inf where R is empty).
double log_uniform_tail(const Entries& e, int64_t vocab_size) {
  const int64_t n_tail = vocab_size - e.n_live();
  return n_tail > 0 ? e.log_tail_mass(vocab_size) - std::log(double(n_tail)) : kNegInf;
}

// Pass 2 of "uniform": sum_R term(log pi, log q_v) and sum_R qa, the I columns excluded.
template <SparseDivergence D, typename acc_t, typename student_t>
std::pair<double, double> uniform_tail_terms(const student_t* __restrict s, int64_t vocab_size, double inv_t,
                                             const StudentStats& st, const Entries& e, double log_pi,
                                             const Divergence& div, acc_t* __restrict buf, uint8_t* __restrict keep) {
  const acc_t k = static_cast<acc_t>(inv_t), c = static_cast<acc_t>(st.c), log_z = static_cast<acc_t>(st.log_z);
  const acc_t log_p = static_cast<acc_t>(log_pi), coefficient = static_cast<acc_t>(div.coefficient),
              weight = static_cast<acc_t>(div.teacher_weight);
  double total = 0, partial = 0;
  size_t next = 0;
  for (int64_t start = 0; start < vocab_size; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab_size - start);
    chunk_without_entries(s, start, n, e.sorted, next, buf, keep);
#pragma omp simd reduction(+ : total, partial)
    for (int64_t j = 0; j < n; ++j) {
      const Outcome<acc_t> o = outcome<D>(log_p, (buf[j] - c) * k - log_z, coefficient, weight);
      total += where_live(keep[j] != 0, o.term);
      partial += where_live(keep[j] != 0, o.qa);
    }
  }
  return {total, partial};
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

std::vector<at::Tensor> sparse_divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const std::string& divergence,
    const std::string& tail, double coefficient, double inv_temperature, int64_t vocab_size) {
  sparse_args::check_inputs(student, teacher_ids, teacher_logprobs, vocab_size, c10::DeviceType::CPU, kWhere);
  const SparseDivergence kind = sparse_args::divergence_of(divergence, coefficient, kWhere);
  const SparseTail mode = sparse_args::tail_of(tail, kWhere);
  const int64_t n = n_rows(student), k_entries = teacher_ids.size(1);
  const at::ScalarType acc = sparse_args::accumulation_dtype(student, teacher_logprobs);
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, student.device(), "mask", kWhere);
  const at::Tensor target_c = row_vector(target, n, at::kLong, student.device(), "target", kWhere);
  const bool streamed = sparse_args::streams_the_row(mode, target_c.defined());
  const at::Tensor log_p = teacher_logprobs.to(at::kDouble).contiguous();
  const auto opts = student.options().dtype(acc);
  at::Tensor value = at::empty({n}, opts), student_logprob = at::empty({n}, opts), entropy = at::empty({n}, opts),
             mean_partial = at::empty({n}, opts), row_stats = at::empty({n, 4}, opts);
  const Divergence div{kind, coefficient, minillm::sparse_teacher_weight(kind, coefficient)};

  dispatch_ids(teacher_ids, [&](const auto* ids_base) {
    dispatch_student(student, acc == at::kDouble, [&](const auto* s_base, auto acc_tag) {
      using acc_t = decltype(acc_tag);
      const minillm::RowStrides s_rows = row_strides(student);
      const bool* msk = ptr_or_null<bool>(mask_c);
      const int64_t* tgt = ptr_or_null<int64_t>(target_c);
      const double* log_p_base = log_p.data_ptr<double>();
      acc_t* out[5] = {value.data_ptr<acc_t>(), student_logprob.data_ptr<acc_t>(), entropy.data_ptr<acc_t>(),
                       mean_partial.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>()};

      at::parallel_for(0, n, grain_rows(vocab_size), [&](int64_t begin, int64_t end) {
        alignas(64) acc_t buf[kChunk];
        alignas(64) uint8_t keep[kChunk];  // (bytes: a bool array keeps gcc from vectorising)
        Entries e;
        for (int64_t i = begin; i < end; ++i) {
          acc_t* st = out[4] + 4 * i;
          if (msk != nullptr && !msk[i]) {
            out[0][i] = out[1][i] = out[2][i] = out[3][i] = 0;
            st[0] = st[1] = st[2] = st[3] = 0;
            continue;
          }
          const auto* s = s_base + s_rows.offset(i);
          read_entries<acc_t>(s, ids_base + i * k_entries, log_p_base + i * k_entries, k_entries, vocab_size, e);
          const TailSums sums = streamed ? tail_sums<acc_t>(s, vocab_size, inv_temperature, e, buf, keep) : TailSums{};
          const StudentStats stats = student_stats(sums, e, inv_temperature);
          // NaN of the row: a NaN log-probability, a live id out of range, NaN in the student's logits it reads.
          double nan_row = nan_of(e.p_sum) + (e.out_of_range ? kNaN : 0.0);
          double total = 0, partial = 0;
          if (mode == SparseTail::kRenormalized) {
            if (e.n_live() > 0) {
              const EntryNormaliser q_norm(e, inv_temperature);
              const double log_mass = entries_log_mass(e);
              for (int64_t j = 0; j < e.n_live(); ++j) {
                const Outcome<double> o = div(e.log_p[j] - log_mass,
                                              inv_temperature * (e.logit[j] - q_norm.c) - q_norm.log_z);
                total += o.term;
                partial += o.qa;
              }
              nan_row += nan_of(q_norm.log_z);
            }
          } else {
            for (int64_t j = 0; j < e.n_live(); ++j) {
              const Outcome<double> o = div(e.log_p[j], stats.log_q(e.logit[j], inv_temperature));
              total += o.term;
              partial += o.qa;
            }
            if (e.n_live() < vocab_size) {
              if (mode == SparseTail::kBin) {
                const Outcome<double> o = div(e.log_tail_mass(vocab_size), stats.log_tail_mass(inv_temperature));
                total += o.term;
                partial += o.qa;
              } else {
                with_divergence(kind, [&](auto d) {
                  const auto [t, p] = uniform_tail_terms<decltype(d)::value, acc_t>(
                      s, vocab_size, inv_temperature, stats, e, log_uniform_tail(e, vocab_size), div, buf, keep);
                  total += t;
                  partial += p;
                });
              }
            }
            nan_row += nan_of(stats.log_z);
          }
          out[0][i] = static_cast<acc_t>(total + nan_row);
          out[3][i] = static_cast<acc_t>(partial + nan_row);
          if (tgt != nullptr) {
            const int64_t y = tgt[i];
            out[1][i] = static_cast<acc_t>(y >= 0 && y < vocab_size
                                               ? stats.log_q(double(load_as<acc_t>(s, y)), inv_temperature)
                                               : kNaN);
          } else {
            out[1][i] = 0;
          }
          out[2][i] = static_cast<acc_t>(streamed ? stats.entropy : 0.0);
          st[0] = static_cast<acc_t>(stats.c);
          st[1] = static_cast<acc_t>(stats.log_z);
          st[2] = static_cast<acc_t>(stats.c_r);
          st[3] = static_cast<acc_t>(stats.log_z_r);
        }
      });
    });
  });
  return {value, student_logprob, entropy, mean_partial, row_stats};
}

at::Tensor sparse_divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const at::Tensor& grad_value,
    const c10::optional<at::Tensor>& grad_student_logprob, const c10::optional<at::Tensor>& grad_entropy,
    const at::Tensor& entropy, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, const std::string& tail, double coefficient, double inv_temperature,
    int64_t vocab_size) {
  sparse_args::check_inputs(student, teacher_ids, teacher_logprobs, vocab_size, c10::DeviceType::CPU, kWhere);
  const SparseDivergence kind = sparse_args::divergence_of(divergence, coefficient, kWhere);
  const SparseTail mode = sparse_args::tail_of(tail, kWhere);
  const int64_t n = n_rows(student), k_entries = teacher_ids.size(1), width = student.size(2);
  const at::Device device = student.device();
  const at::ScalarType acc = sparse_args::accumulation_dtype(student, teacher_logprobs);
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, device, "mask", kWhere);
  const at::Tensor target_c = row_vector(target, n, at::kLong, device, "target", kWhere);
  const at::Tensor g_c = row_vector(grad_value, n, acc, device, "grad_value", kWhere);
  const at::Tensor b_c = row_vector(grad_student_logprob, n, acc, device, "grad_student_logprob", kWhere);
  const at::Tensor c_c = row_vector(grad_entropy, n, acc, device, "grad_entropy", kWhere);
  const at::Tensor h_c = row_vector(entropy, n, acc, device, "entropy", kWhere);
  const at::Tensor m_c = row_vector(mean_partial, n, acc, device, "mean_partial", kWhere);
  TORCH_CHECK(g_c.defined() && h_c.defined() && m_c.defined(), kWhere,
              ": grad_value, entropy and mean_partial are required");
  const at::Tensor stats_c = row_stats_of(row_stats, n, acc, device, kWhere);
  const bool streamed = sparse_args::streams_the_row(mode, target_c.defined());
  const at::Tensor log_p = teacher_logprobs.to(at::kDouble).contiguous();
  at::Tensor grad = at::empty({n, width}, student.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad);
  const Divergence div{kind, coefficient, minillm::sparse_teacher_weight(kind, coefficient)};

  dispatch_ids(teacher_ids, [&](const auto* ids_base) {
    dispatch_student(student, acc == at::kDouble, [&](const auto* s_base, auto acc_tag) {
      using acc_t = decltype(acc_tag);
      using student_t = ElementOf<decltype(s_base)>;
      const minillm::RowStrides s_rows = row_strides(student);
      student_t* g_base = grad.data_ptr<student_t>();
      const bool* msk = ptr_or_null<bool>(mask_c);
      const int64_t* tgt = ptr_or_null<int64_t>(target_c);
      const acc_t *g_p = g_c.data_ptr<acc_t>(), *b_p = ptr_or_null<acc_t>(b_c), *c_p = ptr_or_null<acc_t>(c_c),
                  *h_p = h_c.data_ptr<acc_t>(), *m_p = m_c.data_ptr<acc_t>(), *stats_p = stats_c.data_ptr<acc_t>();
      const double* log_p_base = log_p.data_ptr<double>();

      with_column_mode(mode, kind, [&](auto tail_tag, auto divergence_tag) {
        constexpr SparseTail kTail = decltype(tail_tag)::value;
        [[maybe_unused]] constexpr SparseDivergence kDivergence = decltype(divergence_tag)::value;  // (uniform only)
        at::parallel_for(0, n, grain_rows(width), [&](int64_t begin, int64_t end) {
          Entries e;
          for (int64_t i = begin; i < end; ++i) {
            student_t* out = g_base + i * width;
            if (msk != nullptr && !msk[i]) {
              std::memset(static_cast<void*>(out), 0, sizeof(student_t) * width);
              continue;
            }
            const auto* s = s_base + s_rows.offset(i);
            read_entries<acc_t>(s, ids_base + i * k_entries, log_p_base + i * k_entries, k_entries, vocab_size, e);
            const acc_t* st = stats_p + 4 * i;
            const StudentStats stats{double(st[0]), double(st[1]), double(st[2]), double(st[3]), double(h_p[i])};
            const double k = inv_temperature, g = g_p[i], mean = m_p[i];
            // The token statistics' upstream gradients: only with a target (then the row is streamed).
            const double b = (tgt != nullptr && b_p != nullptr) ? double(b_p[i]) : 0.0;
            const double c = (streamed && c_p != nullptr) ? double(c_p[i]) : 0.0;
            const int64_t y = tgt != nullptr ? tgt[i] : -1;
            if (streamed) {
              // The R formula on every column (those of I are written again below).
              const acc_t ka = acc_t(k), ga = acc_t(g), ba = acc_t(b), ca = acc_t(c), mean_a = acc_t(mean),
                          h = acc_t(stats.entropy), c_s = acc_t(stats.c), log_z = acc_t(stats.log_z),
                          c_r = acc_t(stats.c_r);
              // bin: q_v a_R = (q_v / Q_R) qa_R, the share q_v / Q_R = exp(k (s_v - c_R) - log Z_R) (0 without tail
              // mass)
              const bool has_tail = stats.log_z_r != kNegInf;
              const acc_t log_z_r = has_tail ? acc_t(stats.log_z_r) : acc_t(0);
              const acc_t tail_qa = has_tail && kTail == SparseTail::kBin
                  ? acc_t(div(e.log_tail_mass(vocab_size), stats.log_tail_mass(k)).qa) : acc_t(0);
              const acc_t log_pi = acc_t(log_uniform_tail(e, vocab_size)), coefficient_a = acc_t(div.coefficient),
                          weight_a = acc_t(div.teacher_weight);
#pragma omp simd
              for (int64_t v = 0; v < vocab_size; ++v) {
                const acc_t x = load_as<acc_t>(s, v);
                const acc_t log_q = (x - c_s) * ka - log_z;
                const acc_t q = fast_exp(log_q);
                const acc_t token = ba * (acc_t(v == y) - q) - ca * where_live(q > 0, q * (log_q + h));
                acc_t divergence_part = 0;  // (renormalized: the tail columns are not in the divergence)
                if constexpr (kTail == SparseTail::kBin) {
                  divergence_part = fast_exp((x - c_r) * ka - log_z_r) * tail_qa - q * mean_a;
                } else if constexpr (kTail == SparseTail::kUniform) {
                  divergence_part = outcome<kDivergence>(log_pi, log_q, coefficient_a, weight_a).qa - q * mean_a;
                }
                store_rounded(out, v, ka * (ga * divergence_part + token));
              }
            } else {
              std::memset(static_cast<void*>(out), 0, sizeof(student_t) * vocab_size);
            }
            // The K columns of I (renormalized: q^ from the entries' own normaliser, p^ from their mass).
            double entries_c = 0, entries_log_z = 0, log_mass = 0;
            if (mode == SparseTail::kRenormalized) {
              const EntryNormaliser q_norm(e, k);
              entries_c = q_norm.c;
              entries_log_z = q_norm.log_z;
              log_mass = entries_log_mass(e);
            }
            for (int64_t j = 0; j < e.n_live(); ++j) {
              const int64_t v = e.column[j];
              double token = 0, qa_minus_mean = 0;
              if (streamed) {
                const double log_q = stats.log_q(e.logit[j], k), q = std::exp(log_q);
                token = b * (double(v == y) - q) - c * (q > 0 ? q * (log_q + stats.entropy) : 0.0);
                if (mode != SparseTail::kRenormalized) {
                  qa_minus_mean = div(e.log_p[j], log_q).qa - q * mean;
                }
              }
              if (mode == SparseTail::kRenormalized) {
                const double log_q = k * (e.logit[j] - entries_c) - entries_log_z;
                qa_minus_mean = div(e.log_p[j] - log_mass, log_q).qa - std::exp(log_q) * mean;
              }
              store_rounded(out, v, k * (g * qa_minus_mean + token));
            }
            if (width > vocab_size) {
              std::memset(static_cast<void*>(out + vocab_size), 0, sizeof(student_t) * (width - vocab_size));
            }
          }
        });
      });
    });
  });
  return grad;
}
