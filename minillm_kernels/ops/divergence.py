"""The divergence family beside the reverse KL as ``torch.library`` custom ops: one op, several kernels.

``minillm_kernels::divergence`` computes, per row of ``[..., V]`` logits (N rows, laid out as for
``ops/reverse_kld.py``: the leading dimensions with any strides, read through ``row_view`` with no copy), one of
``KERNEL_DIVERGENCES`` of the teacher p = softmax(t / T) and the student q = softmax(s / T) over the first
``vocab_size`` columns, and saves for the backward the row statistics ``(c_s, log Z_s, c_t, log Z_t)`` and
``mean_partial = sum_v q_v dD/dq_v``. ``minillm_kernels::divergence_backward`` turns the per-row upstream gradient g
into the student's logit gradient, in one pass:

    dD/ds_v = (1/T) q_v (a_v - sum_u q_u a_u),   a_v = dD/dq_v,

with q_v a_v (finite wherever the value is): forward KL -p_v; JSD (1 - beta) q_v log(q_v / m_v); skew forward KL
-p_v (1 - alpha p_v / m_v); skew reverse KL q_v (log(q_v / m_v) + 1 - alpha q_v / m_v); TVD 1/2 q_v sign(q_v - p_v).
Passes over a row: 2 forward (both log-normalisers, then the terms: the mixtures and TVD need log q_v and log p_v
of every column before any term), 1 backward. The reverse KL keeps its single-pass kernels (``token_stats``), and a
skew of 0 (where the skew KLs are the plain ones) goes to those of the plain KL: see
``validation.divergence_coefficient``.

Dtypes as for the reverse KL: each input read in its own dtype, arithmetic in float32 (float64 if either is
float64), per-row outputs in ``stats_dtype``, the gradient in the student's dtype; masked rows are not read (0).
Kernels: "cpu" (``csrc/cpu/divergence_kernel.h``), "triton" (``ops/divergence_triton.py``) and "cuda"
(``csrc/cuda/divergence.cu``), with one signature.
"""
from __future__ import annotations

from typing import Optional

import torch

from minillm_kernels import backends
from minillm_kernels.ops.autograd import differentiable
from minillm_kernels.backends import compute_dtype, fresh_gradient, n_rows, row_view
from minillm_kernels.validation import check_coefficient

Tensor = torch.Tensor

# The divergences these kernels compute (the reverse KL is reverse_kld's).
KERNEL_DIVERGENCES = ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


@torch.library.custom_op("minillm_kernels::divergence", mutates_args=())
def divergence(
    student: Tensor,
    teacher: Tensor,
    mask: Optional[Tensor],
    divergence: str,
    coefficient: float,
    inv_temperature: float,
    vocab_size: int,
    backend: str,
    given_row_stats: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(divergence, mean_partial, row_stats)`` of ``[..., V]`` logits, ``[N]``, ``[N]`` and ``[N, 4]``; ``mask`` is
    ``[N]``; ``coefficient`` is beta for "jsd", the skew for the skew KLs (in (0, 1)), unused otherwise.

    ``given_row_stats`` ``[N, 4]`` (in the accumulation dtype): the kernel skips its first pass and evaluates the
    terms with these log-normalisers (one pass), returning them as ``row_stats``. A vocabulary shard given the whole
    vocabulary's (``parallel.py``) gets its share of the global value and of sum_v q_v a_v ("cpu" and "triton")."""
    check_coefficient(divergence, coefficient)
    if n_rows(student) == 0:
        return _empty_outputs(student, teacher)
    forward = backends.kernels(backend).divergence
    if given_row_stats is None:
        return tuple(forward(row_view(student), row_view(teacher), mask, divergence, coefficient, inv_temperature,
                             vocab_size))
    if backend not in ("cpu", "triton"):
        raise NotImplementedError(f"given row statistics (a sharded vocabulary's divergence={divergence!r}) run on "
                                  f"the 'cpu' and 'triton' kernels, not {backend!r} yet")
    return tuple(forward(row_view(student), row_view(teacher), mask, divergence, coefficient, inv_temperature,
                         vocab_size, given_row_stats))


@divergence.register_fake
def _(student, teacher, mask, divergence, coefficient, inv_temperature, vocab_size, backend, given_row_stats=None):
    return _empty_outputs(student, teacher)


def _empty_outputs(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rows, dtype = n_rows(student), compute_dtype(student.dtype, teacher.dtype)
    return student.new_empty(rows, dtype=dtype), student.new_empty(rows, dtype=dtype), \
        student.new_empty(rows, 4, dtype=dtype)


@torch.library.custom_op("minillm_kernels::divergence_backward", mutates_args=())
def divergence_backward(
    student: Tensor,
    teacher: Tensor,
    mask: Optional[Tensor],
    grad_divergence: Tensor,
    mean_partial: Tensor,
    row_stats: Tensor,
    divergence: str,
    coefficient: float,
    inv_temperature: float,
    vocab_size: int,
    backend: str,
) -> Tensor:
    """The gradient of ``sum_i g_i D_i`` with respect to ``student``, ``g = grad_divergence`` ``[N]``: a fresh
    contiguous tensor of the student's shape."""
    if n_rows(student) == 0:
        return fresh_gradient(student)
    backward = backends.kernels(backend).divergence_backward
    grad = backward(row_view(student), row_view(teacher), mask, grad_divergence, mean_partial, row_stats, divergence,
                    coefficient, inv_temperature, vocab_size)
    return grad.view(student.shape)


@divergence_backward.register_fake
def _(student, teacher, mask, grad_divergence, mean_partial, row_stats, divergence, coefficient, inv_temperature,
      vocab_size, backend):
    return fresh_gradient(student)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, mask, divergence, coefficient, inv_temperature, vocab_size, backend, _ = inputs
    _, mean_partial, row_stats = output
    ctx.save_for_backward(student, teacher, mask, mean_partial, row_stats)
    ctx.arguments = (divergence, coefficient, inv_temperature, vocab_size, backend)


def _backward(ctx, grad_divergence, grad_mean_partial, grad_row_stats):
    student, teacher, mask, mean_partial, row_stats = ctx.saved_tensors
    grad = grad_divergence.to(mean_partial.dtype).contiguous()  # (expanded, from .sum())
    grad_student = divergence_backward(student, teacher, mask, grad, mean_partial, row_stats, *ctx.arguments)
    return grad_student, None, None, None, None, None, None, None, None


# The op with its gradient, for torch.autograd and torch.func (ops/autograd.py): what callers that differentiate call.
differentiable_divergence = differentiable(divergence, _backward, _setup_context)
