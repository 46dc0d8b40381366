// Argument checks and helpers shared by the reverse-KL kernels' tensor-level entry points (csrc/cpu, csrc/cuda):
// one place for the contract of forward(student, teacher, target, mask, inv_temperature, vocab_size) and
// backward(...).
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace reverse_kld_args {

// The accumulation (and per-row output) dtype: double if either logits tensor is float64, float otherwise.
inline at::ScalarType accumulation_dtype(const at::Tensor& student, const at::Tensor& teacher) {
  return student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_logits_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}

// student [N, Vs] and teacher [N, Vt] on `device`, each float32, float64, bfloat16 or float16 (the two may
// differ), last-dim stride 1, vocab_size in [1, min(Vs, Vt)]. `where` names the backend in the messages, e.g.
// "reverse_kld (cuda)".
inline void check_logits(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_size,
                         c10::DeviceType device, const char* where) {
  TORCH_CHECK(student.device().type() == device && teacher.device() == student.device(), where,
              ": student and teacher logits must be ", device, " tensors on one device, got ", student.device(),
              " and ", teacher.device());
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, where, ": logits must be 2-D [N, V], got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.size(0) == teacher.size(0), where, ": student and teacher have different row counts: ",
              student.size(0), " vs ", teacher.size(0));
  TORCH_CHECK(is_logits_dtype(student.scalar_type()) && is_logits_dtype(teacher.scalar_type()), where,
              ": logits must be float32, float64, bfloat16 or float16, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= student.size(1) && vocab_size <= teacher.size(1), where,
              ": vocab_size must be in [1, min(Vs, Vt)] = [1, ", std::min(student.size(1), teacher.size(1)),
              "], got ", vocab_size);
  TORCH_CHECK((student.stride(1) == 1 || student.size(1) == 1) && (teacher.stride(1) == 1 || teacher.size(1) == 1),
              where, ": logits must have last-dim stride 1, got strides ", student.strides(), " and ",
              teacher.strides());
}

// Contiguous [n] tensor of `dtype` on `device` from an optional per-row tensor (undefined if absent or
// undefined), after checking it.
inline at::Tensor row_vector(const c10::optional<at::Tensor>& x, int64_t n, at::ScalarType dtype,
                             const at::Device& device, const char* name, const char* where) {
  if (!x.has_value() || !x->defined()) return at::Tensor();
  TORCH_CHECK(x->device() == device, where, ": ", name, " must be on ", device, ", got ", x->device());
  TORCH_CHECK(x->dim() == 1 && x->size(0) == n, where, ": ", name, " must have shape [", n, "], got ", x->sizes());
  TORCH_CHECK(x->scalar_type() == dtype, where, ": ", name, " must be ", dtype, ", got ", x->scalar_type());
  return x->contiguous();
}

// row_stats from the forward: [n, 4] of the accumulation dtype on `device` (returned contiguous).
inline at::Tensor row_stats_of(const at::Tensor& row_stats, int64_t n, at::ScalarType dtype,
                               const at::Device& device, const char* where) {
  TORCH_CHECK(row_stats.defined(), where, ": row_stats from the forward pass is required");
  TORCH_CHECK(row_stats.device() == device && row_stats.dim() == 2 && row_stats.size(0) == n &&
                  row_stats.size(1) == 4 && row_stats.scalar_type() == dtype,
              where, ": row_stats must be a ", device, " ", dtype, " tensor of shape [", n, ", 4], got ",
              row_stats.device(), " ", row_stats.scalar_type(), " ", row_stats.sizes());
  return row_stats.contiguous();
}

// The per-row tensors of backward(...), checked against the [n_rows, V] logits and made contiguous:
// target int64 and mask bool (undefined if absent); the upstream gradients of (KL, log q(y), H) in the
// accumulation dtype (undefined counts as zeros); kl, entropy and row_stats [n, 4] from the forward (required).
struct BackwardRows {
  at::Tensor target, mask, grad_kl, grad_student_logprob, grad_entropy, kl, entropy, row_stats;
};

inline BackwardRows backward_rows(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_kl, const at::Tensor& grad_student_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& kl, const at::Tensor& entropy, const at::Tensor& row_stats, const char* where) {
  const int64_t n = student.size(0);
  const at::Device device = student.device();
  const at::ScalarType acc = accumulation_dtype(student, teacher);
  BackwardRows rows{
      row_vector(target, n, at::kLong, device, "target", where),
      row_vector(mask, n, at::kBool, device, "mask", where),
      row_vector(grad_kl, n, acc, device, "grad_kl", where),
      row_vector(grad_student_logprob, n, acc, device, "grad_student_logprob", where),
      row_vector(grad_entropy, n, acc, device, "grad_entropy", where),
      row_vector(kl, n, acc, device, "kl", where),
      row_vector(entropy, n, acc, device, "entropy", where),
      row_stats_of(row_stats, n, acc, device, where),
  };
  TORCH_CHECK(rows.kl.defined() && rows.entropy.defined(), where,
              ": kl and entropy from the forward pass are required");
  return rows;
}

// The data of an optional (possibly undefined) tensor, or nullptr.
template <typename T>
const T* ptr_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

}  // namespace reverse_kld_args
