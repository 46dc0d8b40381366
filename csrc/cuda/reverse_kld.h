// Fused reverse-KL (KL(q || p)) CUDA kernels, tensor-level entry points: the same contract as the CPU kernels
// (csrc/cpu/reverse_kld.h), for CUDA tensors. The kernels themselves are in reverse_kld.cu.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// student [n_outer, rows_per_outer, Vs], teacher [n_outer', rows_per_outer', Vt]: the N rows of each, in order, with
// any strides in the first two dims (each its own; see csrc/common/row_strides.h) and last-dim stride 1; each float32,
// float64, bfloat16 or float16, the two may differ, on one CUDA device. target int64 [N] and mask bool [N] optional;
// only the first vocab_size columns are read. Returns, in the accumulation dtype (double if either input is float64,
// else float): {kl [N], student_logprob [N], teacher_logprob [N], entropy [N], row_stats [N, 4] = (c_s, log Z_s, c_t,
// log Z_t)} (c: the row maxima of the raw logits). Rows with mask False are not read; their outputs are 0. An unmasked
// row whose target is outside [0, vocab_size) gets NaN log-probabilities (its other outputs as usual).
std::vector<at::Tensor> reverse_kld_forward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    double inv_temperature, int64_t vocab_size);

// reverse_kld_forward into caller-given outputs (contiguous, accumulation dtype, shapes as above), every element of
// which it writes.
void reverse_kld_forward_out(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    double inv_temperature, int64_t vocab_size,
    const at::Tensor& kl, const at::Tensor& student_logprob, const at::Tensor& teacher_logprob,
    const at::Tensor& entropy, const at::Tensor& row_stats);

// Gradient [N, Vs] (contiguous, student dtype) of sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i with respect to the
// student logits, given the upstream grads a, b, c ([N], accumulation dtype; an undefined tensor counts as zeros)
// and kl, entropy, row_stats from reverse_kld_forward. b_i counts as 0 where the target is outside [0, vocab_size).
// Padding columns [vocab_size, Vs) and masked rows get 0.
at::Tensor reverse_kld_backward(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_kl, const at::Tensor& grad_student_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& kl, const at::Tensor& entropy, const at::Tensor& row_stats,
    double inv_temperature, int64_t vocab_size);

// reverse_kld_backward into a caller-given gradient [N, Vs] (contiguous, student dtype), every element of which it
// writes.
void reverse_kld_backward_out(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_kl, const at::Tensor& grad_student_logprob, const at::Tensor& grad_entropy,
    const at::Tensor& kl, const at::Tensor& entropy, const at::Tensor& row_stats,
    double inv_temperature, int64_t vocab_size, const at::Tensor& grad_student);
