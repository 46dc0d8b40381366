"""Triton kernels for the reverse-KL family: one streaming pass per row forward, one backward.

Per row (token) with s' = s / T and t' = t / T over the first ``vocab_size`` columns, the forward
kernel keeps the running maxima m_s, m_t and, centred on them for accuracy at |logits| ~ 1e4,
    Z_s = sum_v e_v,  e_v = exp(s'_v - m_s)          Z_t = sum_v exp(t'_v - m_t)
    E   = sum_v e_v (s'_v - m_s)                      A   = sum_v e_v ((s'_v - m_s) - (t'_v - m_t))
rescaled whenever a block raises a maximum (online softmax). Then, with log q_v = s'_v - m_s - log Z_s
and log p_v = t'_v - m_t - log Z_t,
    KL(q || p) = A / Z_s - log Z_s + log Z_t,      H(q) = log Z_s - E / Z_s,
and log q(y), log p(y) come from one extra load each. Terms with e_v = 0 count 0, so a column that is
-inf in both models contributes 0, never NaN. The row statistics (m_s, log Z_s, m_t, log Z_t) are
kept for the backward kernel, which writes in one pass
    grad_v = (1/T) (q_v (a (log q_v - log p_v - KL) - b - c (log q_v + H)) + b [v == y])
with a = dL/dKL, b = dL/dlog q(y), c = dL/dH per row. Accumulation is float32 whatever the input
dtype. Memory traffic per row of V columns: forward reads s and t once (2V elements), backward reads
s and t once and writes the gradient once (3V elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# A finite stand-in for -inf as the initial running maximum, so that exp(m_old - m_new) is never
# exp(-inf - -inf) = NaN when a whole block is -inf.
_LOWEST = tl.constexpr(-3.0e38)


@triton.jit
def _reverse_kld_forward_kernel(
    student_ptr, teacher_ptr, target_ptr, mask_ptr,
    kl_ptr, student_logprob_ptr, teacher_logprob_ptr, entropy_ptr, row_stats_ptr,
    student_row_stride, teacher_row_stride, vocab_size, inv_temperature,
    HAS_TARGET: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # int64 row index: row * row_stride passes 2^31 once N * V does (16k tokens x 152k vocab).
    row = tl.program_id(0).to(tl.int64)
    student_ptr += row * student_row_stride
    teacher_ptr += row * teacher_row_stride
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0)  # a masked row reads nothing

    m_s = tl.full((), _LOWEST, tl.float32)
    m_t = tl.full((), _LOWEST, tl.float32)
    z_s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    e_acc = tl.zeros((), tl.float32)
    a_acc = tl.zeros((), tl.float32)
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        s = tl.load(student_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        t = tl.load(teacher_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        new_m_s = tl.maximum(m_s, tl.max(s, axis=0))
        new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
        # Re-centre the accumulators on the new maxima: e_v picks up r_s, (s' - m_s) shifts by
        # (m_s - new_m_s) and (t' - m_t) by (m_t - new_m_t).
        shift_s = m_s - new_m_s
        r_s = tl.exp(shift_s)
        a_acc = r_s * (a_acc + (shift_s - (m_t - new_m_t)) * z_s)
        e_acc = r_s * (e_acc + shift_s * z_s)
        z_s = r_s * z_s
        z_t = tl.exp(m_t - new_m_t) * z_t
        m_s = new_m_s
        m_t = new_m_t

        centred_s = s - m_s
        centred_t = t - m_t
        e = tl.exp(centred_s)
        live = e > 0
        z_s += tl.sum(e, axis=0)
        z_t += tl.sum(tl.exp(centred_t), axis=0)
        e_acc += tl.sum(tl.where(live, e * centred_s, 0.0), axis=0)
        a_acc += tl.sum(tl.where(live, e * (centred_s - centred_t), 0.0), axis=0)

    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    kl = a_acc / z_s - log_z_s + log_z_t
    entropy = log_z_s - e_acc / z_s
    tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
    tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))
    tl.store(row_stats_ptr + 4 * row + 0, tl.where(valid, m_s, 0.0))
    tl.store(row_stats_ptr + 4 * row + 1, tl.where(valid, log_z_s, 0.0))
    tl.store(row_stats_ptr + 4 * row + 2, tl.where(valid, m_t, 0.0))
    tl.store(row_stats_ptr + 4 * row + 3, tl.where(valid, log_z_t, 0.0))
    if HAS_TARGET:
        target = tl.where(valid, tl.load(target_ptr + row), 0)  # masked rows may hold ignore ids
        s_y = tl.load(student_ptr + target).to(tl.float32) * inv_temperature
        t_y = tl.load(teacher_ptr + target).to(tl.float32) * inv_temperature
        tl.store(student_logprob_ptr + row, tl.where(valid, (s_y - m_s) - log_z_s, 0.0))
        tl.store(teacher_logprob_ptr + row, tl.where(valid, (t_y - m_t) - log_z_t, 0.0))


@triton.jit
def _reverse_kld_backward_kernel(
    student_ptr, teacher_ptr, target_ptr, mask_ptr,
    grad_kl_ptr, grad_student_logprob_ptr, grad_entropy_ptr,
    kl_ptr, entropy_ptr, row_stats_ptr, grad_student_ptr,
    student_row_stride, teacher_row_stride, student_width, vocab_size, inv_temperature,
    HAS_TARGET: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: see the forward kernel
    student_ptr += row * student_row_stride
    teacher_ptr += row * teacher_row_stride
    grad_student_ptr += row * student_width
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0)  # a masked row reads nothing and gets a zero gradient

    a = tl.load(grad_kl_ptr + row).to(tl.float32)
    c = tl.load(grad_entropy_ptr + row).to(tl.float32)
    kl = tl.load(kl_ptr + row).to(tl.float32)
    entropy = tl.load(entropy_ptr + row).to(tl.float32)
    m_s = tl.load(row_stats_ptr + 4 * row + 0).to(tl.float32)
    log_z_s = tl.load(row_stats_ptr + 4 * row + 1).to(tl.float32)
    m_t = tl.load(row_stats_ptr + 4 * row + 2).to(tl.float32)
    log_z_t = tl.load(row_stats_ptr + 4 * row + 3).to(tl.float32)
    if HAS_TARGET:
        b = tl.where(valid, tl.load(grad_student_logprob_ptr + row).to(tl.float32), 0.0)
        target = tl.load(target_ptr + row)
    else:
        b = 0.0
        target = -1
    # q_v * (a (lq - lp - KL) - b - c (lq + H)) = q_v * ((a - c) lq - a lp + const)
    const = -a * kl - b - c * entropy
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, student_width, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        s = tl.load(student_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
        log_q = (s - m_s) - log_z_s
        log_p = (t - m_t) - log_z_t
        q = tl.exp(log_q)
        grad = tl.where(q > 0, q * ((a - c) * log_q - a * log_p + const), 0.0)
        grad += tl.where(cols == target, b, 0.0)
        tl.store(grad_student_ptr + cols, grad * inv_temperature, mask=cols < student_width)


def _block_size(vocab_size: int) -> int:
    return min(triton.next_power_of_2(max(vocab_size, 1)), 4096)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    vocab_size: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel: ``(kl, student_logprob, teacher_logprob, entropy, row_stats)``."""
    n_rows = student.shape[0]
    stats_dtype = torch.promote_types(student.dtype, torch.float32)
    kl, student_logprob, teacher_logprob, entropy = (
        student.new_zeros(n_rows, dtype=stats_dtype) for _ in range(4)
    )
    row_stats = student.new_empty(n_rows, 4, dtype=stats_dtype)
    block_v = _block_size(vocab_size)
    _reverse_kld_forward_kernel[(n_rows,)](
        student, teacher, target if target is not None else kl, mask if mask is not None else kl,
        kl, student_logprob, teacher_logprob, entropy, row_stats,
        student.stride(0), teacher.stride(0), vocab_size, inv_temperature,
        HAS_TARGET=target is not None, HAS_MASK=mask is not None, BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return kl, student_logprob, teacher_logprob, entropy, row_stats


def backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    grad_kl: torch.Tensor,
    grad_student_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    row_stats: torch.Tensor,
    inv_temperature: float,
    vocab_size: int,
) -> torch.Tensor:
    """Launch the backward kernel: the gradient with respect to ``student``, ``[N, V_s]``."""
    n_rows, student_width = student.shape
    grad_student = torch.empty((n_rows, student_width), dtype=student.dtype, device=student.device)
    block_v = _block_size(vocab_size)
    _reverse_kld_backward_kernel[(n_rows,)](
        student, teacher, target if target is not None else kl, mask if mask is not None else kl,
        grad_kl, grad_student_logprob, grad_entropy, kl, entropy, row_stats, grad_student,
        student.stride(0), teacher.stride(0), student_width, vocab_size, inv_temperature,
        HAS_TARGET=target is not None, HAS_MASK=mask is not None, BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return grad_student
