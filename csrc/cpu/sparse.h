// Fused CPU kernels of the sparse teacher: a divergence of the student from a teacher given as its top-k (id,
// log-probability) pairs per row, the tail completed by a tail mode, and its gradient. See sparse_kernel.h.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// student [n_outer, rows_per_outer, Vs]: a row view (any strides in the first two dims, last-dim stride 1, float32,
// float64, bfloat16 or float16); teacher_ids [N, K] int32/int64 and teacher_logprobs [N, K] (any float dtype),
// contiguous, -inf = no entry; target int64 [N] optional (token statistics); mask bool [N] optional; only the first
// vocab_size columns are read. `divergence` is one of "reverse_kl", "forward_kl", "jsd", "skew_forward_kl",
// "skew_reverse_kl", "tvd" (coefficient: beta, or the skew, in (0, 1) for the mixtures), `tail` one of "bin",
// "uniform", "renormalized". Returns, in the accumulation dtype (double if the student or the log-probabilities are
// float64, else float): {value [N], student_logprob [N] (0 without a target), entropy [N] (0 where the row is not
// streamed), mean_partial [N] = M, row_stats [N, 4] = (c, log Z, c_R, log Z_R)}; masked rows get 0.
std::vector<at::Tensor> sparse_divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const std::string& divergence,
    const std::string& tail, double coefficient, double inv_temperature, int64_t vocab_size);

// The gradient [N, Vs] (contiguous, student dtype) of sum_i (g_i D_i + b_i log q_i(y_i) + c_i H_i), from the upstream
// gradients g = grad_value, b = grad_student_logprob, c = grad_entropy ([N], accumulation dtype; b and c may be
// undefined: zeros) and the forward's entropy, mean_partial and row_stats.
at::Tensor sparse_divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const at::Tensor& grad_value,
    const c10::optional<at::Tensor>& grad_student_logprob, const c10::optional<at::Tensor>& grad_entropy,
    const at::Tensor& entropy, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, const std::string& tail, double coefficient, double inv_temperature,
    int64_t vocab_size);
