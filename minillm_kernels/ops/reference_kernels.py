"""The "reference" backend's kernels: the naive formulas of ``reference.py`` in the kernels' shape.

Each function has the signature and the outputs of the CPU, Triton and CUDA kernels of its family (``Kernels`` in
``backends.py``): the rows of ``[n_outer, rows_per_outer, V]`` row views (reshaped to ``[N, V]``, a copy where the
strides need one), k = 1/T, the per-row values with the row statistics and ``mean_partial = sum_v q_v a_v`` the
backward of the kernels takes, and the backward in closed form (``reference.token_stats_gradient``,
``divergence_gradient``, ``sparse_divergence_gradient``: inside a custom op autograd does not record). So the
reference runs through the same custom ops as every backend, under torch.compile and torch.func alike, its gradient
first order as theirs. Arithmetic as the formulas do it: log-softmaxes in ``compute_dtype``, sums by torch's
reductions (the tests' "naive" bounds); every output of a masked row is 0, as in the kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from minillm_kernels import reference
from minillm_kernels.backends import compute_dtype

Tensor = torch.Tensor


def _rows(view: Tensor) -> Tensor:
    """A ``[n_outer, rows_per_outer, V]`` row view as ``[N, V]`` rows."""
    return view.reshape(-1, view.shape[-1])


def _unmasked_rows(outputs: tuple[Tensor, ...], mask: Optional[Tensor]) -> tuple[Tensor, ...]:
    """``outputs`` (``[N]`` or ``[N, 4]``, fresh tensors) with the rows ``mask`` leaves out set to 0."""
    if mask is None:
        return tuple(x.clone() for x in outputs)  # (distinct tensors: an op's outputs may not alias each other)
    return tuple(torch.where(mask if x.dim() == 1 else mask[:, None], x, 0.0) for x in outputs)


# ---------------------------------------------------------------------------------------------------------------
# The reverse KL and the token statistics (ops/reverse_kld.py)
# ---------------------------------------------------------------------------------------------------------------
def token_stats(student: Tensor, teacher: Tensor, target: Optional[Tensor], mask: Optional[Tensor],
                inv_temperature: float, vocab_size: int) -> tuple[Tensor, ...]:
    """``(kl, student_logprob, teacher_logprob, entropy, row_stats)``: ``reference.token_stats`` and
    ``reference.row_stats``."""
    student, teacher, temperature = _rows(student), _rows(teacher), 1.0 / inv_temperature
    stats = reference.token_stats(student, teacher, target, mask, temperature, vocab_size)
    return _unmasked_rows((*stats, reference.row_stats(student, teacher, temperature, vocab_size)), mask)


def token_stats_backward(student: Tensor, teacher: Tensor, target: Optional[Tensor], mask: Optional[Tensor],
                         grad_kl: Tensor, grad_student_logprob: Tensor, grad_entropy: Tensor, kl: Tensor,
                         entropy: Tensor, row_stats: Tensor, inv_temperature: float, vocab_size: int) -> Tensor:
    """``reference.token_stats_gradient``, ``[N, V_s]``."""
    return reference.token_stats_gradient(
        _rows(student), _rows(teacher), target, mask, (grad_kl, grad_student_logprob, grad_entropy),
        (kl, entropy, row_stats), 1.0 / inv_temperature, vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# The divergence family (ops/divergence.py)
# ---------------------------------------------------------------------------------------------------------------
def divergence(student: Tensor, teacher: Tensor, mask: Optional[Tensor], divergence: str, coefficient: float,
               inv_temperature: float, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(value, mean_partial, row_stats)``: ``reference.divergence``, the sum of ``reference.divergence_partials``'
    q a, ``reference.row_stats``. ``coefficient`` is beta and the skew alike (each divergence reads its own)."""
    student, teacher, temperature = _rows(student), _rows(teacher), 1.0 / inv_temperature
    value = reference.divergence(student, teacher, mask, temperature, vocab_size, divergence, beta=coefficient,
                                 skew=coefficient)
    _, partials = reference.divergence_partials(student, teacher, mask, temperature, vocab_size, divergence,
                                                beta=coefficient, skew=coefficient)
    row_stats = reference.row_stats(student, teacher, temperature, vocab_size)
    return _unmasked_rows((value, partials.sum(-1), row_stats), mask)


def divergence_backward(student: Tensor, teacher: Tensor, mask: Optional[Tensor], grad_divergence: Tensor,
                        mean_partial: Tensor, row_stats: Tensor, divergence: str, coefficient: float,
                        inv_temperature: float, vocab_size: int) -> Tensor:
    """``reference.divergence_gradient``, ``[N, V_s]`` (which recomputes the row's softmaxes and sum_v q_v a_v)."""
    return reference.divergence_gradient(_rows(student), _rows(teacher), mask, grad_divergence, 1.0 / inv_temperature,
                                         vocab_size, divergence, beta=coefficient, skew=coefficient)


# ---------------------------------------------------------------------------------------------------------------
# The sparse teacher (ops/sparse.py)
# ---------------------------------------------------------------------------------------------------------------
def sparse_divergence(student: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, target: Optional[Tensor],
                      mask: Optional[Tensor], divergence: str, tail: str, coefficient: float, inv_temperature: float,
                      vocab_size: int) -> tuple[Tensor, ...]:
    """``(value, student_logprob, entropy, mean_partial, row_stats)``: ``reference.sparse_divergence``; log q(y) and
    H(q) of ``reference.token_stats`` (log q(y) 0 without a target; H 0 where the kernels do not stream the row:
    "renormalized" without a target); the sum of ``reference.sparse_divergence_partials``' q a; the row statistics
    (c, log Z, c_R, log Z_R) of the student's row and of its tail R (the columns outside the entries)."""
    student, temperature = _rows(student), 1.0 / inv_temperature
    value = reference.sparse_divergence(student, teacher_ids, teacher_logprobs, mask, temperature, vocab_size,
                                        divergence, tail, beta=coefficient, skew=coefficient)
    _, partials = reference.sparse_divergence_partials(student, teacher_ids, teacher_logprobs, mask, temperature,
                                                       vocab_size, divergence, tail, beta=coefficient,
                                                       skew=coefficient)
    student = student.to(value.dtype)  # (the token statistics in the dtype of the log-probabilities' pair too)
    _, student_logprob, _, entropy = reference.token_stats(student, student, target, mask, temperature, vocab_size)
    if target is None and tail == "renormalized":
        entropy = torch.zeros_like(entropy)
    entries = reference.sparse_entries(teacher_ids, teacher_logprobs, vocab_size, value.dtype).in_entries
    tail_logits = torch.where(entries, -math.inf, student[:, :vocab_size])
    row_stats = reference.row_stats(student, tail_logits, temperature, vocab_size)
    return _unmasked_rows((value, student_logprob, entropy, partials.sum(-1), row_stats), mask)


def sparse_divergence_backward(student: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                               target: Optional[Tensor], mask: Optional[Tensor], grad_value: Tensor,
                               grad_student_logprob: Tensor, grad_entropy: Tensor, entropy: Tensor,
                               mean_partial: Tensor, row_stats: Tensor, divergence: str, tail: str, coefficient: float,
                               inv_temperature: float, vocab_size: int) -> Tensor:
    """``reference.sparse_divergence_gradient`` and, with a target, the token statistics' part of
    ``reference.token_stats_gradient`` (b of log q(y), c of H), summed in the accumulation dtype and rounded once to
    the student's, ``[N, V_s]``."""
    rows, temperature = _rows(student), 1.0 / inv_temperature
    wide = rows.to(compute_dtype(rows.dtype, teacher_logprobs.dtype))
    grad = reference.sparse_divergence_gradient(wide, teacher_ids, teacher_logprobs, mask, grad_value, temperature,
                                                vocab_size, divergence, tail, beta=coefficient, skew=coefficient)
    if target is not None:
        student_stats = row_stats[:, :2].to(wide.dtype)  # (c, log Z): the student's, and its own "teacher"'s
        grad = grad + reference.token_stats_gradient(
            wide, wide, target, mask, (torch.zeros_like(grad_value), grad_student_logprob, grad_entropy),
            (torch.zeros_like(entropy), entropy, torch.cat((student_stats, student_stats), -1)), temperature,
            vocab_size)
    return grad.to(student.dtype)
