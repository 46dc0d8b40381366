// Argument checks and helpers shared by the kernels' tensor-level entry points (csrc/cpu, csrc/cuda), both
// families (reverse_kld, divergence): one place for the contract of forward(student, teacher, target, mask,
// inv_temperature, vocab_size) and backward(...).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "divergence_kind.h"
#include "row_strides.h"

namespace logits_args {

// The accumulation (and per-row output) dtype: double if either logits tensor is float64, float otherwise.
inline at::ScalarType accumulation_dtype(const at::Tensor& student, const at::Tensor& teacher) {
  return student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_logits_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}

// The rows of [n_outer, rows_per_outer, V] logits: N = n_outer * rows_per_outer.
inline int64_t n_rows(const at::Tensor& logits) {
  return logits.size(0) * logits.size(1);
}

// Row r of [n_outer, rows_per_outer, V] logits starts at (r / rows_per_outer) * stride(0) + (r % rows_per_outer) *
// stride(1) (see row_strides.h). rows_per_outer is at least 1, so that a layout of zero rows divides by nothing.
inline minillm::RowStrides row_strides(const at::Tensor& logits) {
  return minillm::RowStrides{std::max<int64_t>(logits.size(1), 1), logits.stride(0), logits.stride(1)};
}

// student [n_outer, rows_per_outer, Vs] and teacher [n_outer', rows_per_outer', Vt] (each its own split of the N
// rows and its own strides in the first two dims, as minillm_kernels/ops/reverse_kld.py's row_view gives them) on
// `device`, each float32, float64, bfloat16 or float16 (the two may differ), last-dim stride 1, vocab_size in
// [1, min(Vs, Vt)]. `where` names the backend in the messages, e.g. "reverse_kld (cuda)".
inline void check_logits(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_size,
                         c10::DeviceType device, const char* where) {
  TORCH_CHECK(student.device().type() == device && teacher.device() == student.device(), where,
              ": student and teacher logits must be ", device, " tensors on one device, got ", student.device(),
              " and ", teacher.device());
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, where,
              ": logits must be 3-D [n_outer, rows_per_outer, V] row views, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(n_rows(student) == n_rows(teacher), where, ": student and teacher have different row counts: ",
              n_rows(student), " vs ", n_rows(teacher));
  TORCH_CHECK(is_logits_dtype(student.scalar_type()) && is_logits_dtype(teacher.scalar_type()), where,
              ": logits must be float32, float64, bfloat16 or float16, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= student.size(2) && vocab_size <= teacher.size(2), where,
              ": vocab_size must be in [1, min(Vs, Vt)] = [1, ", std::min(student.size(2), teacher.size(2)),
              "], got ", vocab_size);
  TORCH_CHECK((student.stride(2) == 1 || student.size(2) == 1) && (teacher.stride(2) == 1 || teacher.size(2) == 1),
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

// The per-row tensors of backward(...), checked against the N rows of the logits and made contiguous:
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
  const int64_t n = n_rows(student);
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

// The kernels' divergence of a name (the names of minillm_kernels/ops/divergence.py's KERNEL_DIVERGENCES), after
// checking the coefficient (beta or skew) the mixtures need; ``where`` names the backend in the errors.
inline minillm::DivergenceKind divergence_of(const std::string& name, double coefficient, const char* where) {
  using minillm::DivergenceKind;
  const bool mixture = name == "jsd" || name == "skew_forward_kl" || name == "skew_reverse_kl";
  TORCH_CHECK(!mixture || (coefficient > 0 && coefficient < 1), where, ": ", name,
              " needs a coefficient (beta or skew) in (0, 1), got ", coefficient);
  if (name == "forward_kl") return DivergenceKind::kForwardKl;
  if (name == "jsd") return DivergenceKind::kJsd;
  if (name == "skew_forward_kl") return DivergenceKind::kSkewForwardKl;
  if (name == "skew_reverse_kl") return DivergenceKind::kSkewReverseKl;
  if (name == "tvd") return DivergenceKind::kTvd;
  TORCH_CHECK(false, where, ": divergence must be one of forward_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd "
              "(the reverse KL has its own kernel), got ", name);
}

}  // namespace logits_args
