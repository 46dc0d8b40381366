"""The sparse teacher's kernel family as ``torch.library`` custom ops: one op, several kernels.

``minillm_kernels::sparse_divergence`` computes, per row of ``[..., V]`` student logits (N rows, laid out as for
``ops/reverse_kld.py``: read through ``row_view`` with no copy) and ``[N, K]`` teacher ids and log-probabilities (-inf:
no entry), one of ``reference.DIVERGENCES`` of the student q = softmax(s / T) over the first ``vocab_size`` columns from
the teacher completed by the ``tail`` mode ("bin", "uniform", "renormalized"; docs/design.md, "The sparse teacher"),
and, with a target, the token statistics log q(y) and H(q). It saves for the backward the row statistics
``(c, log Z, c_R, log Z_R)`` (the row's and its tail's centre and log-normaliser), the entropy and
``mean_partial = M = sum_o q_o dD/dq_o`` over the outcomes. ``minillm_kernels::sparse_divergence_backward`` turns the
per-row upstream gradients (g of the value, b of log q(y), c of H) into the student's logit gradient in one pass:

    grad_v = (1/T) (g (q_v a_v - q_v M) + b ([v = y] - q_v) - c q_v (log q_v + H)),

q_v a_v: the entry's outcome on I; on R, bin (q_v / Q_R) Q_R a_R, uniform the column's own, renormalized 0.

The contract every kernel keeps: the student read in its own dtype (float32, float64, bfloat16, float16), the
log-probabilities in theirs (any float dtype), the ids int32 or int64; arithmetic in float32, float64 if the student
or the log-probabilities are float64, and per-row outputs in that dtype (``stats_dtype``); the gradient in the
student's dtype, 0 past ``vocab_size`` and in masked rows (which are not read). No kernel reads outside its row: a
live id outside ``[0, vocab_size)`` makes its row NaN (the public functions refuse it in eager mode). Kernels: "cpu"
(``csrc/cpu/sparse_kernel.h``), "triton" (``ops/sparse_triton.py``), "cuda" (``csrc/cuda/sparse.cu``) and "reference"
(``ops/reference_kernels.py``), with one signature.
"""
from __future__ import annotations

from typing import Optional

import torch

from minillm_kernels import backends
from minillm_kernels.backends import compute_dtype, fresh_gradient, n_rows, row_view
from minillm_kernels.ops.autograd import differentiable

Tensor = torch.Tensor


@torch.library.custom_op("minillm_kernels::sparse_divergence", mutates_args=())
def sparse_divergence(
    student: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    target: Optional[Tensor],
    mask: Optional[Tensor],
    divergence: str,
    tail: str,
    coefficient: float,
    inv_temperature: float,
    vocab_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(value, student_logprob, entropy, mean_partial, row_stats)`` of ``[..., V]`` student logits and ``[N, K]``
    contiguous teacher ids and log-probabilities: ``[N]`` each, row_stats ``[N, 4]``; ``target`` and ``mask`` are
    ``[N]``; ``coefficient`` is beta for "jsd", the skew for the skew KLs (in (0, 1)), unused otherwise. Without a
    target, student_logprob is 0; entropy is 0 where the row is not streamed ("renormalized" without a target)."""
    if n_rows(student) == 0:
        return _empty_outputs(student, teacher_logprobs)
    forward = backends.kernels(backend).sparse_divergence
    return tuple(forward(row_view(student), teacher_ids, teacher_logprobs, target, mask, divergence, tail,
                         coefficient, inv_temperature, vocab_size))


@sparse_divergence.register_fake
def _(student, teacher_ids, teacher_logprobs, target, mask, divergence, tail, coefficient, inv_temperature,
      vocab_size, backend):
    return _empty_outputs(student, teacher_logprobs)


def _empty_outputs(student: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows, dtype = n_rows(student), compute_dtype(student.dtype, teacher_logprobs.dtype)
    per_row = tuple(student.new_empty(rows, dtype=dtype) for _ in range(4))
    return (*per_row, student.new_empty(rows, 4, dtype=dtype))


@torch.library.custom_op("minillm_kernels::sparse_divergence_backward", mutates_args=())
def sparse_divergence_backward(
    student: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    target: Optional[Tensor],
    mask: Optional[Tensor],
    grad_value: Tensor,
    grad_student_logprob: Tensor,
    grad_entropy: Tensor,
    entropy: Tensor,
    mean_partial: Tensor,
    row_stats: Tensor,
    divergence: str,
    tail: str,
    coefficient: float,
    inv_temperature: float,
    vocab_size: int,
    backend: str,
) -> Tensor:
    """The gradient of ``sum_i g_i D_i + b_i log q_i(y_i) + c_i H_i`` with respect to ``student`` (``g, b, c`` the three
    upstream gradients, ``[N]``): a fresh contiguous tensor of the student's shape."""
    if n_rows(student) == 0:
        return fresh_gradient(student)
    backward = backends.kernels(backend).sparse_divergence_backward
    grad = backward(row_view(student), teacher_ids, teacher_logprobs, target, mask, grad_value, grad_student_logprob,
                    grad_entropy, entropy, mean_partial, row_stats, divergence, tail, coefficient, inv_temperature,
                    vocab_size)
    return grad.view(student.shape)


@sparse_divergence_backward.register_fake
def _(student, teacher_ids, teacher_logprobs, target, mask, grad_value, grad_student_logprob, grad_entropy, entropy,
      mean_partial, row_stats, divergence, tail, coefficient, inv_temperature, vocab_size, backend):
    return fresh_gradient(student)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher_ids, teacher_logprobs, target, mask, *arguments = inputs
    _, _, entropy, mean_partial, row_stats = output
    ctx.save_for_backward(student, teacher_ids, teacher_logprobs, target, mask, entropy, mean_partial, row_stats)
    ctx.arguments = arguments  # (divergence, tail, coefficient, inv_temperature, vocab_size, backend)


def _backward(ctx, grad_value, grad_student_logprob, grad_entropy, grad_mean_partial, grad_row_stats):
    student, teacher_ids, teacher_logprobs, target, mask, entropy, mean_partial, row_stats = ctx.saved_tensors
    # Unused outputs have no gradient; expanded ones (from .sum()) must be made contiguous.
    g, b, c = (entropy.new_zeros(entropy.shape) if x is None else x.to(entropy.dtype).contiguous()
               for x in (grad_value, grad_student_logprob, grad_entropy))
    grad_student = sparse_divergence_backward(student, teacher_ids, teacher_logprobs, target, mask, g, b, c, entropy,
                                              mean_partial, row_stats, *ctx.arguments)
    return grad_student, None, None, None, None, None, None, None, None, None, None


# The op with its gradient, for torch.autograd and torch.func (ops/autograd.py): what callers that differentiate call.
differentiable_sparse_divergence = differentiable(sparse_divergence, _backward, _setup_context)


def sparse_rows(
    student: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, target: Optional[Tensor], mask: Optional[Tensor],
    divergence: str, tail: str, coefficient: float, temperature: float, vocab_size: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(value, student_logprob, entropy)`` per row, ``[N]`` each (differentiable in the student), on ``backend``;
    ``divergence`` and ``coefficient`` as ``validation.divergence_coefficient`` gives them."""
    value, student_logprob, entropy, _, _ = differentiable_sparse_divergence(
        student, teacher_ids, teacher_logprobs, target, mask, divergence, tail, coefficient, 1.0 / temperature,
        vocab_size, backend)
    return value, student_logprob, entropy
