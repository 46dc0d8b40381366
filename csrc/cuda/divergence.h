// CUDA kernels of the divergence family beside the reverse KL, tensor-level entry points: the CPU kernels' contract
// (csrc/cpu/divergence.h) for CUDA tensors. The kernels themselves are in divergence.cu.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// As csrc/cpu/divergence.h's divergence_forward, on one CUDA device: {divergence [N], mean_partial [N],
// row_stats [N, 4]} in the accumulation dtype.
std::vector<at::Tensor> divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size);

// As csrc/cpu/divergence.h's divergence_backward: the gradient [N, Vs] (contiguous, student dtype).
at::Tensor divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_divergence, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size);
