"""The reverse-KL family as ``torch.library`` custom ops: one op, several kernels.

``minillm_kernels::token_stats`` computes, per row of ``[..., V]`` logits (N rows: the leading dimensions,
in row-major order), the reverse KL, the log-probabilities of a target token under both models, the student
entropy and the row statistics ``(c_s, log Z_s, c_t, log Z_t)`` that the backward needs (see
``reverse_kld_triton`` for the formulas), each ``[N]`` (``[N, 4]``). ``minillm_kernels::token_stats_backward``
turns per-row upstream gradients ``a = dL/dKL, b = dL/dlog q(y), c = dL/dH`` into the one gradient of the
student logits, a fresh contiguous tensor of the student's shape.
The ``backend`` argument picks the kernel ("cpu": the C++ kernel, "triton", "cuda": the CUDA C++
kernels); both ops have fake implementations, so ``torch.compile(fullgraph=True)`` traces through
them, and the forward op has an autograd formula (registered, and as an ``autograd.Function`` for ``torch.func``:
``ops/autograd.py``), so only per-row scalars are saved between forward and backward.

Row layout: the logits' last dimension has stride 1, the leading ones any strides (a ``[:, -(N+1):-1]`` slice of
a model's ``[B, L, V]`` output, a transposed ``[T, B, V]``, a column slice of wider rows, a stride-0 ``expand``);
student and teacher may be laid out differently. ``row_view`` coalesces each one's leading dimensions into at
most two levels and hands the kernels the ``[n_outer, rows_per_outer, V]`` view, whose strides give each row's
offset, ``(r // rows_per_outer) * outer_stride + (r % rows_per_outer) * inner_stride``: no copy. Only leading
dimensions that do not coalesce into two levels (three or more that no merging joins, e.g. every other row of
each of three leading dimensions) are copied, inside the op, to contiguous rows.

The contract every kernel keeps:
- student and teacher may have different float dtypes (float32, float64, bfloat16, float16): each is read
  in its own dtype, with no copy; the arithmetic is float32, float64 if either is float64. Per-row outputs
  (and the upstream gradients a, b, c) have ``stats_dtype(student, teacher)``; the gradient has the
  student's dtype.
- No kernel reads outside the first ``vocab_size`` columns of a row, whatever ``target`` holds. An unmasked
  row whose target is outside ``[0, vocab_size)`` gets NaN log-probabilities (its KL and entropy as usual), and
  in the backward its log q(y) = s'_y - lse(s') has no one-hot [v = y] but keeps the -b q_v of its lse part:
  exactly what ``reference.token_stats`` gives under autograd. The public functions raise a ValueError for such
  ids in eager mode; this is what a ``torch.compile`` graph (where that data-dependent check cannot run) gets,
  and what a vocabulary shard that does not hold a row's target is given (``parallel.py``). Masked rows are not
  read and may hold any id.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from minillm_kernels import backends
from minillm_kernels.backends import compute_dtype, fresh_gradient, n_rows, row_view
from minillm_kernels.ops.autograd import differentiable

Tensor = torch.Tensor


@torch.library.custom_op("minillm_kernels::token_stats", mutates_args=())
def token_stats(
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    mask: Optional[Tensor],
    inv_temperature: float,
    vocab_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(kl, student_logprob, teacher_logprob, entropy, row_stats)`` of ``[..., V]`` logits, each ``[N]`` (row_stats
    ``[N, 4]``); ``target`` and ``mask`` are ``[N]``."""
    if n_rows(student) == 0:
        return _empty_stats(student, teacher)
    return tuple(backends.kernels(backend).token_stats(
        row_view(student), row_view(teacher), target, mask, inv_temperature, vocab_size
    ))


@token_stats.register_fake
def _(student, teacher, target, mask, inv_temperature, vocab_size, backend):
    return _empty_stats(student, teacher)


def _empty_stats(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows, dtype = n_rows(student), compute_dtype(student.dtype, teacher.dtype)
    per_row = tuple(student.new_empty(rows, dtype=dtype) for _ in range(4))
    return (*per_row, student.new_empty(rows, 4, dtype=dtype))


@torch.library.custom_op("minillm_kernels::token_stats_backward", mutates_args=())
def token_stats_backward(
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    mask: Optional[Tensor],
    grad_kl: Tensor,
    grad_student_logprob: Tensor,
    grad_entropy: Tensor,
    kl: Tensor,
    entropy: Tensor,
    row_stats: Tensor,
    inv_temperature: float,
    vocab_size: int,
    backend: str,
) -> Tensor:
    """The gradient of ``sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i`` with respect to ``student``: a fresh
    contiguous tensor of its shape, whatever the student's strides (autograd takes it for the strided input)."""
    if n_rows(student) == 0:
        return fresh_gradient(student)
    grad = backends.kernels(backend).token_stats_backward(
        row_view(student), row_view(teacher), target, mask, grad_kl, grad_student_logprob, grad_entropy,
        kl, entropy, row_stats, inv_temperature, vocab_size,
    )
    return grad.view(student.shape)


@token_stats_backward.register_fake
def _(student, teacher, target, mask, grad_kl, grad_student_logprob, grad_entropy,
      kl, entropy, row_stats, inv_temperature, vocab_size, backend):
    return fresh_gradient(student)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, target, mask, inv_temperature, vocab_size, backend = inputs
    kl, _, _, entropy, row_stats = output
    ctx.save_for_backward(student, teacher, target, mask, kl, entropy, row_stats)
    ctx.inv_temperature, ctx.vocab_size, ctx.backend = inv_temperature, vocab_size, backend


def _backward(ctx, grad_kl, grad_student_logprob, grad_teacher_logprob, grad_entropy, grad_row_stats):
    student, teacher, target, mask, kl, entropy, row_stats = ctx.saved_tensors
    # Unused outputs have no gradient; expanded ones (from .sum()) must be made contiguous.
    a, b, c = (kl.new_zeros(kl.shape) if g is None else g.to(kl.dtype).contiguous()
               for g in (grad_kl, grad_student_logprob, grad_entropy))
    grad_student = token_stats_backward(
        student, teacher, target, mask, a, b, c, kl, entropy, row_stats,
        ctx.inv_temperature, ctx.vocab_size, ctx.backend,
    )
    return grad_student, None, None, None, None, None, None


# The op with its gradient, for torch.autograd and torch.func (ops/autograd.py): what callers that differentiate call.
differentiable_token_stats = differentiable(token_stats, _backward, _setup_context)


# --------------------------------------------------------------------------------------------------------------
# Any backend, and shards of a vocabulary: what the fused-linear chunk loop and the
# vocabulary-parallel losses (``parallel.py``) call inside their own custom ops and autograd functions.
# --------------------------------------------------------------------------------------------------------------
def backend_token_stats(
    student: Tensor, teacher: Tensor, target: Optional[Tensor], mask: Optional[Tensor], temperature: float,
    vocab_size: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``token_stats`` of ``[..., V]`` logits on ``backend``. ``vocab_size`` may be 0 (a vocabulary shard
    holding no real column): KL = H = 0, log-probabilities NaN (0 where masked; zeros without a target) and row
    statistics (0, -inf, 0, -inf), i.e. log-normalisers -inf, no share of either softmax; nothing is read."""
    if vocab_size == 0:
        kl, student_logprob, teacher_logprob, entropy, row_stats = (x.zero_() for x in _empty_stats(student, teacher))
        if target is not None:
            no_column = torch.full_like(kl, math.nan) if mask is None else torch.where(mask, math.nan, kl)
            student_logprob, teacher_logprob = no_column, no_column.clone()
        row_stats[:, 1::2] = -math.inf
        return kl, student_logprob, teacher_logprob, entropy, row_stats
    return token_stats(student, teacher, target, mask, 1.0 / temperature, vocab_size, backend)


def backend_logit_gradient(
    student: Tensor, teacher: Tensor, target: Optional[Tensor], mask: Optional[Tensor],
    upstream: tuple[Tensor, Tensor, Tensor], saved: tuple[Tensor, Tensor, Tensor], temperature: float,
    vocab_size: int, backend: str,
) -> Tensor:
    """``token_stats_backward`` on ``backend``: the gradient of sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i with
    respect to ``student``, contiguous, of its shape, from ``upstream = (a, b, c)`` and ``saved = (kl, entropy,
    row_stats)`` (what ``backend_token_stats`` gave, or statistics that stand for them, e.g. a whole vocabulary's);
    zeros for ``vocab_size`` 0."""
    if vocab_size == 0:
        return fresh_gradient(student).zero_()
    return token_stats_backward(student, teacher, target, mask, *upstream, *saved, 1.0 / temperature, vocab_size,
                                backend)
