// The divergence family's CPU backward: the gradient of sum_i g_i D_i with respect to the student logits, in one
// pass per row from the forward's row statistics (divergence_kernel.h has the formulas).

#include "divergence.h"

#include "divergence_kernel.h"
#include "streaming.h"

#include <cstdint>
#include <cstring>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

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
