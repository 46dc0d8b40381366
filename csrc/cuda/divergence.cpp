// CUDA kernels of the divergence family: argument checks, output allocation, device and stream, launch error checks.
// The kernels are in divergence.cu, behind the torch-free divergence_launch.h.
#include "divergence.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/logits_args.h"
#include "divergence_launch.h"
#include "host_checks.h"

namespace {

constexpr const char* kWhere = "divergence (cuda)";

using minillm_cuda::DivergenceKind;
using logits_args::accumulation_dtype;
using logits_args::check_logits;
using logits_args::divergence_of;
using logits_args::n_rows;
using logits_args::ptr_or_null;
using logits_args::row_stats_of;
using logits_args::row_strides;
using logits_args::row_vector;

// The teacher's weight w in the mixture m = w p + (1 - w) q.
double teacher_weight_of(DivergenceKind kind, double coefficient) {
  return kind == DivergenceKind::kSkewReverseKl ? 1 - coefficient : coefficient;
}

}  // namespace

std::vector<at::Tensor> divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CUDA, kWhere);
  minillm_cuda_host::check_width(vocab_size, kWhere);
  const DivergenceKind kind = divergence_of(divergence, coefficient, kWhere);
  const int64_t n = n_rows(student);
  const at::Device device = student.device();
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, device, "mask", kWhere);
  const auto opts = student.options().dtype(accumulation_dtype(student, teacher));
  at::Tensor value = at::empty({n}, opts);
  at::Tensor mean_partial = at::empty({n}, opts);
  at::Tensor row_stats = at::empty({n, 4}, opts);

  minillm_cuda::DivergenceForwardLaunch args{};
  args.student_dtype = minillm_cuda_host::logits_dtype(student.scalar_type(), kWhere);
  args.teacher_dtype = minillm_cuda_host::logits_dtype(teacher.scalar_type(), kWhere);
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_rows = row_strides(student);
  args.teacher_rows = row_strides(teacher);
  args.mask = ptr_or_null<bool>(mask_c);
  args.value = value.data_ptr();
  args.mean_partial = mean_partial.data_ptr();
  args.row_stats = row_stats.data_ptr();
  args.n_rows = n;
  args.n_cols = static_cast<int>(vocab_size);
  args.divergence = kind;
  args.coefficient = coefficient;
  args.teacher_weight = teacher_weight_of(kind, coefficient);
  args.inv_temperature = inv_temperature;

  const c10::cuda::CUDAGuard guard(device);
  minillm_cuda_host::check_launch(
      minillm_cuda::launch_divergence_forward(args, c10::cuda::getCurrentCUDAStream(device.index())), "forward",
      kWhere);
  return {value, mean_partial, row_stats};
}

at::Tensor divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_divergence, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CUDA, kWhere);
  const DivergenceKind kind = divergence_of(divergence, coefficient, kWhere);
  const int64_t n = n_rows(student);
  const int64_t width = student.size(2);
  minillm_cuda_host::check_width(width, kWhere);
  const at::Device device = student.device();
  const at::ScalarType acc = accumulation_dtype(student, teacher);
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, device, "mask", kWhere);
  const at::Tensor grad_c = row_vector(grad_divergence, n, acc, device, "grad_divergence", kWhere);
  const at::Tensor partial_c = row_vector(mean_partial, n, acc, device, "mean_partial", kWhere);
  TORCH_CHECK(grad_c.defined() && partial_c.defined(), kWhere, ": grad_divergence and mean_partial are required");
  const at::Tensor stats_c = row_stats_of(row_stats, n, acc, device, kWhere);
  at::Tensor grad = at::empty({n, width}, student.options().memory_format(at::MemoryFormat::Contiguous));

  minillm_cuda::DivergenceBackwardLaunch args{};
  args.student_dtype = minillm_cuda_host::logits_dtype(student.scalar_type(), kWhere);
  args.teacher_dtype = minillm_cuda_host::logits_dtype(teacher.scalar_type(), kWhere);
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_rows = row_strides(student);
  args.teacher_rows = row_strides(teacher);
  args.mask = ptr_or_null<bool>(mask_c);
  args.grad_divergence = grad_c.data_ptr();
  args.mean_partial = partial_c.data_ptr();
  args.row_stats = stats_c.data_ptr();
  args.grad_student = grad.data_ptr();
  args.n_rows = n;
  args.n_cols = static_cast<int>(vocab_size);
  args.width = static_cast<int>(width);
  args.divergence = kind;
  args.coefficient = coefficient;
  args.teacher_weight = teacher_weight_of(kind, coefficient);
  args.inv_temperature = inv_temperature;

  const c10::cuda::CUDAGuard guard(device);
  minillm_cuda_host::check_launch(
      minillm_cuda::launch_divergence_backward(args, c10::cuda::getCurrentCUDAStream(device.index())), "backward",
      kWhere);
  return grad;
}
