// Argument checks of the sparse-teacher kernels' tensor-level entry points (csrc/cpu/sparse_*.cpp,
// csrc/cuda/sparse.cpp): one place for the contract of forward(student, teacher_ids, teacher_logprobs, target, mask,
// divergence, tail, coefficient, inv_temperature, vocab_size) and backward(...), and for the names of the divergences
// and tails.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "logits_args.h"
#include "sparse_kind.h"

namespace sparse_args {

// The accumulation (and per-row output) dtype: double if the student logits or the teacher's log-probabilities are
// float64, float otherwise.
inline at::ScalarType accumulation_dtype(const at::Tensor& student, const at::Tensor& teacher_logprobs) {
  return logits_args::accumulation_dtype(student, teacher_logprobs);
}

// student [n_outer, rows_per_outer, Vs] (a row view as minillm_kernels/ops/reverse_kld.py's row_view gives it: any
// strides in the first two dims, last-dim stride 1, float32/float64/bfloat16/float16) on `device`, vocab_size in
// [1, Vs]; teacher_ids [N, K] int32 or int64 and teacher_logprobs [N, K] of a float dtype, both contiguous, on the
// same device, K >= 1.
inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
                         int64_t vocab_size, c10::DeviceType device, const char* where) {
  TORCH_CHECK(student.device().type() == device, where, ": student logits must be a ", device, " tensor, got ",
              student.device());
  TORCH_CHECK(student.dim() == 3, where, ": student logits must be a 3-D [n_outer, rows_per_outer, V] row view, got ",
              student.sizes());
  TORCH_CHECK(logits_args::is_logits_dtype(student.scalar_type()) &&
                  logits_args::is_logits_dtype(teacher_logprobs.scalar_type()),
              where, ": student logits and teacher log-probabilities must be float32, float64, bfloat16 or float16, "
              "got ",
              student.scalar_type(), " and ", teacher_logprobs.scalar_type());
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= student.size(2), where, ": vocab_size must be in [1, ", student.size(2),
              "], got ", vocab_size);
  TORCH_CHECK(student.stride(2) == 1 || student.size(2) == 1, where,
              ": student logits must have last-dim stride 1, got ", student.strides());
  const int64_t n = logits_args::n_rows(student);
  TORCH_CHECK(teacher_ids.device() == student.device() && teacher_logprobs.device() == student.device(), where,
              ": teacher_ids and teacher_logprobs must be on ", student.device(), ", got ", teacher_ids.device(),
              " and ", teacher_logprobs.device());
  TORCH_CHECK(teacher_ids.scalar_type() == at::kInt || teacher_ids.scalar_type() == at::kLong, where,
              ": teacher_ids must be int32 or int64, got ", teacher_ids.scalar_type());
  TORCH_CHECK(teacher_ids.dim() == 2 && teacher_ids.size(0) == n && teacher_ids.size(1) >= 1 &&
                  teacher_logprobs.sizes() == teacher_ids.sizes(),
              where, ": teacher_ids and teacher_logprobs must both be [", n, ", K] with K >= 1, got ",
              teacher_ids.sizes(), " and ", teacher_logprobs.sizes());
  TORCH_CHECK(teacher_ids.is_contiguous() && teacher_logprobs.is_contiguous(), where,
              ": teacher_ids and teacher_logprobs must be contiguous");
}

// The kernels' divergence of a name (minillm_kernels.reference.DIVERGENCES), after checking the coefficient (beta or
// skew) the mixtures need.
inline minillm::SparseDivergence divergence_of(const std::string& name, double coefficient, const char* where) {
  using minillm::SparseDivergence;
  const bool mixture = name == "jsd" || name == "skew_forward_kl" || name == "skew_reverse_kl";
  TORCH_CHECK(!mixture || (coefficient > 0 && coefficient < 1), where, ": ", name,
              " needs a coefficient (beta or skew) in (0, 1), got ", coefficient);
  if (name == "reverse_kl") return SparseDivergence::kReverseKl;
  if (name == "forward_kl") return SparseDivergence::kForwardKl;
  if (name == "jsd") return SparseDivergence::kJsd;
  if (name == "skew_forward_kl") return SparseDivergence::kSkewForwardKl;
  if (name == "skew_reverse_kl") return SparseDivergence::kSkewReverseKl;
  if (name == "tvd") return SparseDivergence::kTvd;
  TORCH_CHECK(false, where, ": divergence must be one of reverse_kl, forward_kl, jsd, skew_forward_kl, "
              "skew_reverse_kl, tvd, got ", name);
}

// The kernels' tail mode of a name (minillm_kernels.reference.SPARSE_TAILS).
inline minillm::SparseTail tail_of(const std::string& name, const char* where) {
  if (name == "bin") return minillm::SparseTail::kBin;
  if (name == "uniform") return minillm::SparseTail::kUniform;
  if (name == "renormalized") return minillm::SparseTail::kRenormalized;
  TORCH_CHECK(false, where, ": tail must be one of bin, uniform, renormalized, got ", name);
}

// Whether the kernels stream the student's row: every mode but "renormalized", which reads only the K entries unless
// the token statistics (a target) need the full log-normaliser.
inline bool streams_the_row(minillm::SparseTail tail, bool has_target) {
  return tail != minillm::SparseTail::kRenormalized || has_target;
}

}  // namespace sparse_args
