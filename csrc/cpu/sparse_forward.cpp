// The sparse teacher's CPU forward: per row, the entries read, pass 1 over the other columns R (unless the tail
// mode needs no statistics of them), the divergence of the entries and the tail, and, for "uniform", pass 2 over R
// (sparse_kernel.h has the formulas).

#include "sparse.h"

#include "sparse_kernel.h"
#include "streaming.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace {

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

double nan_of(double x) { return x - x; }  // 0, or NaN for NaN (and inf)

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
