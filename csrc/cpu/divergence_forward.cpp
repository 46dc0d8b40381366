// The divergence family's CPU forward: checks the arguments, allocates the outputs and runs the row loop of the
// divergence asked for (divergence_forward_rows.h: one unit per divergence).

#include "divergence.h"

#include "divergence_forward_rows.h"

#include <string>
#include <vector>

#include <ATen/ops/empty.h>

std::vector<at::Tensor> divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size,
    const c10::optional<at::Tensor>& given_row_stats) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CPU, kWhere);
  const Divergence kind = divergence_of(divergence, coefficient, kWhere);
  const int64_t n = n_rows(student);
  const auto opts = student.options().dtype(accumulation_dtype(student, teacher));
  const minillm_cpu::ForwardRows rows{
      student,
      teacher,
      row_vector(mask, n, at::kBool, student.device(), "mask", kWhere),
      given_row_stats.has_value() && given_row_stats->defined()
          ? row_stats_of(*given_row_stats, n, accumulation_dtype(student, teacher), student.device(), kWhere)
          : at::Tensor(),
      coefficient,
      inv_temperature,
      vocab_size,
      at::empty({n}, opts),
      at::empty({n}, opts),
      at::empty({n, 4}, opts)};
  with_divergence(kind, [&](auto tag) { minillm_cpu::divergence_forward_rows<decltype(tag)::value>(rows); });
  return {rows.value, rows.mean_partial, rows.row_stats};
}
