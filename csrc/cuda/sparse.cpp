// CUDA kernels of the sparse teacher: argument checks, the teacher's [N, K] tensors in the kernels' dtypes (int64 ids,
// log-probabilities in the accumulation dtype: small copies), output allocation, device and stream, launch error
// checks. The kernels are in sparse.cu, behind the torch-free sparse_launch.h.
#include "sparse.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/sparse_args.h"
#include "host_checks.h"
#include "sparse_launch.h"

namespace {

constexpr const char* kWhere = "sparse_divergence (cuda)";

using logits_args::n_rows;
using logits_args::ptr_or_null;
using logits_args::row_stats_of;
using logits_args::row_strides;
using logits_args::row_vector;

// The launch's inputs, checked; `keep_alive` holds the converted teacher tensors until the launch.
minillm_cuda::SparseInputs inputs_of(const at::Tensor& student, const at::Tensor& teacher_ids,
                                     const at::Tensor& teacher_logprobs, const at::Tensor& target,
                                     const at::Tensor& mask, const std::string& divergence, const std::string& tail,
                                     double coefficient, double inv_temperature, int64_t vocab_size,
                                     std::vector<at::Tensor>& keep_alive) {
  const minillm::SparseDivergence kind = sparse_args::divergence_of(divergence, coefficient, kWhere);
  const minillm::SparseTail mode = sparse_args::tail_of(tail, kWhere);
  const at::ScalarType acc = sparse_args::accumulation_dtype(student, teacher_logprobs);
  TORCH_CHECK(teacher_ids.size(1) <= std::numeric_limits<int>::max(), kWhere, ": at most 2^31 - 1 entries per row");
  keep_alive = {teacher_ids.to(at::kLong).contiguous(), teacher_logprobs.to(acc).contiguous()};
  minillm_cuda::SparseInputs in{};
  in.student_dtype = minillm_cuda_host::logits_dtype(student.scalar_type(), kWhere);
  in.double_accumulation = acc == at::kDouble;
  in.student = student.data_ptr();
  in.student_rows = row_strides(student);
  in.teacher_ids = keep_alive[0].data_ptr<int64_t>();
  in.teacher_logprobs = keep_alive[1].data_ptr();
  in.target = ptr_or_null<int64_t>(target);
  in.mask = ptr_or_null<bool>(mask);
  in.n_rows = n_rows(student);
  in.n_entries = static_cast<int>(teacher_ids.size(1));
  in.n_cols = static_cast<int>(vocab_size);
  in.divergence = kind;
  in.tail = mode;
  in.streamed = sparse_args::streams_the_row(mode, target.defined());
  in.coefficient = coefficient;
  in.teacher_weight = minillm::sparse_teacher_weight(kind, coefficient);
  in.inv_temperature = inv_temperature;
  return in;
}

}  // namespace

std::vector<at::Tensor> sparse_divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const std::string& divergence,
    const std::string& tail, double coefficient, double inv_temperature, int64_t vocab_size) {
  sparse_args::check_inputs(student, teacher_ids, teacher_logprobs, vocab_size, c10::DeviceType::CUDA, kWhere);
  minillm_cuda_host::check_width(vocab_size, kWhere);
  const int64_t n = n_rows(student);
  const at::Device device = student.device();
  const at::Tensor mask_c = row_vector(mask, n, at::kBool, device, "mask", kWhere);
  const at::Tensor target_c = row_vector(target, n, at::kLong, device, "target", kWhere);
  const auto opts = student.options().dtype(sparse_args::accumulation_dtype(student, teacher_logprobs));
  at::Tensor value = at::empty({n}, opts), student_logprob = at::empty({n}, opts), entropy = at::empty({n}, opts),
             mean_partial = at::empty({n}, opts), row_stats = at::empty({n, 4}, opts);

  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep_alive;
  minillm_cuda::SparseForwardLaunch args{};
  args.in = inputs_of(student, teacher_ids, teacher_logprobs, target_c, mask_c, divergence, tail, coefficient,
                      inv_temperature, vocab_size, keep_alive);
  args.value = value.data_ptr();
  args.student_logprob = student_logprob.data_ptr();
  args.entropy = entropy.data_ptr();
  args.mean_partial = mean_partial.data_ptr();
  args.row_stats = row_stats.data_ptr();
  minillm_cuda_host::check_launch(
      minillm_cuda::launch_sparse_forward(args, c10::cuda::getCurrentCUDAStream(device.index())), "forward", kWhere);
  return {value, student_logprob, entropy, mean_partial, row_stats};
}

at::Tensor sparse_divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const at::Tensor& grad_value,
    const c10::optional<at::Tensor>& grad_student_logprob, const c10::optional<at::Tensor>& grad_entropy,
    const at::Tensor& entropy, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, const std::string& tail, double coefficient, double inv_temperature,
    int64_t vocab_size) {
  sparse_args::check_inputs(student, teacher_ids, teacher_logprobs, vocab_size, c10::DeviceType::CUDA, kWhere);
  const int64_t n = n_rows(student), width = student.size(2);
  minillm_cuda_host::check_width(width, kWhere);
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
  at::Tensor grad = at::empty({n, width}, student.options().memory_format(at::MemoryFormat::Contiguous));

  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep_alive;
  minillm_cuda::SparseBackwardLaunch args{};
  args.in = inputs_of(student, teacher_ids, teacher_logprobs, target_c, mask_c, divergence, tail, coefficient,
                      inv_temperature, vocab_size, keep_alive);
  args.grad_value = g_c.data_ptr();
  args.grad_student_logprob = b_c.defined() ? b_c.data_ptr() : nullptr;
  args.grad_entropy = c_c.defined() ? c_c.data_ptr() : nullptr;
  args.entropy = h_c.data_ptr();
  args.mean_partial = m_c.data_ptr();
  args.row_stats = stats_c.data_ptr();
  args.grad_student = grad.data_ptr();
  args.width = static_cast<int>(width);
  minillm_cuda_host::check_launch(
      minillm_cuda::launch_sparse_backward(args, c10::cuda::getCurrentCUDAStream(device.index())), "backward",
      kWhere);
  return grad;
}
