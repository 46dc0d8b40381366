"""The reverse-KL family as ``torch.library`` custom ops: one op, several kernels.

``minillm_kernels::token_stats`` computes, per row of ``[N, V]`` logits, the reverse KL, the
log-probabilities of a target token under both models, the student entropy and the row statistics
``(c_s, log Z_s, c_t, log Z_t)`` that the backward needs (see ``reverse_kld_triton`` for the
formulas). ``minillm_kernels::token_stats_backward`` turns per-row upstream gradients
``a = dL/dKL, b = dL/dlog q(y), c = dL/dH`` into the one ``[N, V]`` gradient of the student logits.
The ``backend`` argument picks the kernel ("cpu": the C++ kernel, "triton", "cuda": the CUDA C++
kernels); both ops have fake implementations, so ``torch.compile(fullgraph=True)`` traces through
them, and the forward op has a registered autograd formula, so only per-row scalars are saved between
forward and backward.

The contract every kernel keeps:
- student and teacher may have different float dtypes (float32, float64, bfloat16, float16): each is read
  in its own dtype, with no copy; the arithmetic is float32, float64 if either is float64. Per-row outputs
  (and the upstream gradients a, b, c) have ``stats_dtype(student, teacher)``; the gradient has the
  student's dtype.
- No kernel reads outside the first ``vocab_size`` columns of a row, whatever ``target`` holds. An unmasked
  row whose target is outside ``[0, vocab_size)`` gets NaN log-probabilities (its KL and entropy as usual), and
  its b counts as 0 in the backward: exactly what ``reference.token_stats`` gives under autograd. The public
  functions raise a ValueError for such ids in eager mode; this is what a ``torch.compile`` graph (where that
  data-dependent check cannot run) gets. Masked rows are not read and may hold any id.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from minillm_kernels import reference

Tensor = torch.Tensor


def _kernels(backend: str) -> ModuleType:
    """The module holding ``forward``/``backward`` for ``backend``."""
    if backend == "cpu":
        from minillm_kernels.cpu import load_extension

        return load_extension()
    if backend == "cuda":
        from minillm_kernels.cuda import load_extension as load_cuda_extension

        return load_cuda_extension()
    if backend == "triton":
        from minillm_kernels.ops import reverse_kld_triton

        return reverse_kld_triton
    raise ValueError(f"no kernels for backend {backend!r}")


# The per-row outputs' dtype, of the logits dtypes: float64 if either is float64, float32 otherwise.
stats_dtype = reference.compute_dtype


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
    """``(kl, student_logprob, teacher_logprob, entropy, row_stats)`` of ``[N, V]`` logits."""
    if student.shape[0] == 0:
        return _empty_stats(student, teacher)
    return tuple(_kernels(backend).forward(student, teacher, target, mask, inv_temperature, vocab_size))


@token_stats.register_fake
def _(student, teacher, target, mask, inv_temperature, vocab_size, backend):
    return _empty_stats(student, teacher)


def _empty_stats(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n_rows, dtype = student.shape[0], stats_dtype(student.dtype, teacher.dtype)
    per_row = tuple(student.new_empty(n_rows, dtype=dtype) for _ in range(4))
    return (*per_row, student.new_empty(n_rows, 4, dtype=dtype))


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
    """The gradient of ``sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i`` with respect to ``student``."""
    if student.shape[0] == 0:
        return torch.empty_like(student, memory_format=torch.contiguous_format)
    return _kernels(backend).backward(
        student, teacher, target, mask, grad_kl, grad_student_logprob, grad_entropy,
        kl, entropy, row_stats, inv_temperature, vocab_size,
    )


@token_stats_backward.register_fake
def _(student, teacher, target, mask, grad_kl, grad_student_logprob, grad_entropy,
      kl, entropy, row_stats, inv_temperature, vocab_size, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


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


token_stats.register_autograd(_backward, setup_context=_setup_context)
