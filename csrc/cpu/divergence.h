// Fused CPU kernels of the divergence family beside the reverse KL (forward KL, generalized JSD, skew forward and
// skew reverse KL, total variation): two streaming passes per row forward, one backward. See divergence_kernel.h.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// student [n_outer, rows_per_outer, Vs], teacher [n_outer', rows_per_outer', Vt]: row views as reverse_kld_forward
// takes them (any strides in the first two dims, last-dim stride 1, float32/float64/bfloat16/float16, the two may
// differ); mask bool [N] optional; only the first vocab_size columns are read. `divergence` is one of
// "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"; `coefficient` is beta in (0, 1) for "jsd", the
// skew in (0, 1) for the skew KLs, unused otherwise. Returns, in the accumulation dtype (double if either input is
// float64, else float): {divergence [N], mean_partial [N] = sum_v q_v dD/dq_v, row_stats [N, 4] = (c_s, log Z_s,
// c_t, log Z_t)}. Masked rows are not read; their outputs are 0. With given_row_stats ([N, 4], accumulation dtype)
// pass 1 is skipped and the terms use those statistics (on a vocabulary shard: the whole vocabulary's, so that the
// outputs are the shard's partial sums of the global terms), which come back as row_stats.
std::vector<at::Tensor> divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size,
    const c10::optional<at::Tensor>& given_row_stats);

// Gradient [N, Vs] (contiguous, student dtype) of sum_i g_i D_i with respect to the student logits, from the upstream
// grads g ([N], accumulation dtype) and mean_partial, row_stats from divergence_forward. Padding columns
// [vocab_size, Vs) and masked rows get 0.
at::Tensor divergence_backward(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
    const at::Tensor& grad_divergence, const at::Tensor& mean_partial, const at::Tensor& row_stats,
    const std::string& divergence, double coefficient, double inv_temperature, int64_t vocab_size);
