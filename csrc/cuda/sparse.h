// CUDA kernels of the sparse teacher, tensor-level entry points: the CPU kernels' contract (csrc/cpu/sparse.h) for
// CUDA tensors. The kernels themselves are in sparse.cu.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// As csrc/cpu/sparse.h's sparse_divergence_forward, on one CUDA device: {value, student_logprob, entropy,
// mean_partial [N], row_stats [N, 4]} in the accumulation dtype.
std::vector<at::Tensor> sparse_divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const std::string& divergence,
    const std::string& tail, double coefficient, double inv_temperature, int64_t vocab_size);

// As csrc/cpu/sparse.h's sparse_divergence_backward: the gradient [N, Vs] (contiguous, student dtype).
at::Tensor sparse_divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask, const at::Tensor& grad_value,
    const c10::optional<at::Tensor>& grad_student_logprob, const c10::optional<at::Tensor>& grad_entropy,
    const at::Tensor& entropy, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, const std::string& tail, double coefficient, double inv_temperature,
    int64_t vocab_size);
