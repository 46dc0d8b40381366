// The sparse teacher's CPU backward: the gradient with respect to the student logits, in one pass over each row
// (the R columns' formula) and then its K entries' columns, from the forward's row statistics (sparse_kernel.h
// has the formulas).

#include "sparse.h"

#include "sparse_kernel.h"
#include "streaming.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace {

template <SparseTail T>
using TailTag = std::integral_constant<SparseTail, T>;

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

}  // namespace

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
