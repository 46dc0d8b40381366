// Fused reverse-KL CUDA kernels: argument checks, output allocation, device and stream, launch error checks.
// The kernels and their launch configuration are in reverse_kld.cu, behind the torch-free reverse_kld_launch.h.
#include "reverse_kld.h"

#include <cstdint>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/logits_args.h"
#include "host_checks.h"
#include "reverse_kld_launch.h"

namespace {

constexpr const char* kWhere = "reverse_kld (cuda)";

using logits_args::accumulation_dtype;
using logits_args::check_logits;
using logits_args::n_rows;
using logits_args::ptr_or_null;
using logits_args::BackwardRows;
using logits_args::backward_rows;
using logits_args::row_strides;
using logits_args::row_vector;

minillm_cuda::LogitsDtype logits_dtype(at::ScalarType dtype) {
  return minillm_cuda_host::logits_dtype(dtype, kWhere);
}

void check_width(int64_t width) {
  minillm_cuda_host::check_width(width, kWhere);
}

// A caller-given output: contiguous, `dtype`, `sizes`, on `device`.
void check_output(const at::Tensor& out, at::IntArrayRef sizes, at::ScalarType dtype, const at::Device& device,
                  const char* name) {
  TORCH_CHECK(out.defined() && out.device() == device && out.scalar_type() == dtype && out.sizes() == sizes &&
                  out.is_contiguous(),
              kWhere, ": ", name, " must be a contiguous ", device, " ", dtype, " tensor of shape ", sizes);
}


const void* data_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr() : nullptr;
}

void check_launch(cudaError_t error, const char* kernel) {
  minillm_cuda_host::check_launch(error, kernel, kWhere);
}

}  // namespace

void reverse_kld_forward_out(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    double inv_temperature, int64_t vocab_size,
    const at::Tensor& kl, const at::Tensor& student_logprob, const at::Tensor& teacher_logprob,
    const at::Tensor& entropy, const at::Tensor& row_stats) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CUDA, kWhere);
  check_width(vocab_size);
  const int64_t n = n_rows(student);
  const at::Device device = student.device();
  const at::Tensor target_c = row_vector(target, n, at::kLong, device, "target", kWhere);
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, device, "mask", kWhere);
  const at::ScalarType acc_dtype = accumulation_dtype(student, teacher);
  check_output(kl, {n}, acc_dtype, device, "kl");
  check_output(student_logprob, {n}, acc_dtype, device, "student_logprob");
  check_output(teacher_logprob, {n}, acc_dtype, device, "teacher_logprob");
  check_output(entropy, {n}, acc_dtype, device, "entropy");
  check_output(row_stats, {n, 4}, acc_dtype, device, "row_stats");

  minillm_cuda::ForwardLaunch args{};
  args.student_dtype = logits_dtype(student.scalar_type());
  args.teacher_dtype = logits_dtype(teacher.scalar_type());
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_rows = row_strides(student);
  args.teacher_rows = row_strides(teacher);
  args.target = ptr_or_null<int64_t>(target_c);
  args.mask = ptr_or_null<bool>(mask_c);
  args.kl = kl.data_ptr();
  args.student_logprob = student_logprob.data_ptr();
  args.teacher_logprob = teacher_logprob.data_ptr();
  args.entropy = entropy.data_ptr();
  args.row_stats = row_stats.data_ptr();
  args.n_rows = n;
  args.n_cols = static_cast<int>(vocab_size);
  args.inv_temperature = inv_temperature;

  const c10::cuda::CUDAGuard guard(device);
  check_launch(minillm_cuda::launch_reverse_kld_forward(args, c10::cuda::getCurrentCUDAStream(device.index())),
               "forward");
}

std::vector<at::Tensor> reverse_kld_forward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CUDA, kWhere);
  const int64_t n = n_rows(student);
  const auto opts = student.options().dtype(accumulation_dtype(student, teacher));
  at::Tensor kl = at::empty({n}, opts);
  at::Tensor student_logprob = at::empty({n}, opts);
  at::Tensor teacher_logprob = at::empty({n}, opts);
  at::Tensor entropy = at::empty({n}, opts);
  at::Tensor row_stats = at::empty({n, 4}, opts);
  reverse_kld_forward_out(student, teacher, target, mask, inv_temperature, vocab_size, kl, student_logprob,
                          teacher_logprob, entropy, row_stats);
  return {kl, student_logprob, teacher_logprob, entropy, row_stats};
}

void reverse_kld_backward_out(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_kl, const at::Tensor& grad_student_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& kl, const at::Tensor& entropy, const at::Tensor& row_stats,
    double inv_temperature, int64_t vocab_size, const at::Tensor& grad_student) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CUDA, kWhere);
  const int64_t n = n_rows(student);
  const int64_t width = student.size(2);
  check_width(width);
  const at::Device device = student.device();
  const BackwardRows rows = backward_rows(student, teacher, target, mask, grad_kl, grad_student_logprob, grad_entropy,
                                          kl, entropy, row_stats, kWhere);
  check_output(grad_student, {n, width}, student.scalar_type(), device, "grad_student");

  minillm_cuda::BackwardLaunch args{};
  args.student_dtype = logits_dtype(student.scalar_type());
  args.teacher_dtype = logits_dtype(teacher.scalar_type());
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_rows = row_strides(student);
  args.teacher_rows = row_strides(teacher);
  args.target = ptr_or_null<int64_t>(rows.target);
  args.mask = ptr_or_null<bool>(rows.mask);
  args.grad_kl = data_or_null(rows.grad_kl);
  args.grad_student_logprob = data_or_null(rows.grad_student_logprob);
  args.grad_entropy = data_or_null(rows.grad_entropy);
  args.kl = rows.kl.data_ptr();
  args.entropy = rows.entropy.data_ptr();
  args.row_stats = rows.row_stats.data_ptr();
  args.grad_student = grad_student.data_ptr();
  args.n_rows = n;
  args.n_cols = static_cast<int>(vocab_size);
  args.width = static_cast<int>(width);
  args.inv_temperature = inv_temperature;

  const c10::cuda::CUDAGuard guard(device);
  check_launch(minillm_cuda::launch_reverse_kld_backward(args, c10::cuda::getCurrentCUDAStream(device.index())),
               "backward");
}

at::Tensor reverse_kld_backward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_kl, const at::Tensor& grad_student_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& kl, const at::Tensor& entropy, const at::Tensor& row_stats,
    double inv_temperature, int64_t vocab_size) {
  check_logits(student, teacher, vocab_size, c10::DeviceType::CUDA, kWhere);
  at::Tensor grad_student =
      at::empty({n_rows(student), student.size(2)}, student.options().memory_format(at::MemoryFormat::Contiguous));
  reverse_kld_backward_out(student, teacher, target, mask, grad_kl, grad_student_logprob, grad_entropy, kl, entropy,
                           row_stats, inv_temperature, vocab_size, grad_student);
  return grad_student;
}
