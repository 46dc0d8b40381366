"""Triton kernels for the reverse-KL family: one streaming pass per row forward, one backward.

Per row (token), over the first ``vocab_size`` columns of the student logits s and the teacher logits t,
with k = 1/T, the forward kernel keeps the running maxima of the raw logits and, centred on them
(c_s, c_t; with u_v = s_v - c_s, w_v = t_v - c_t),
    Z_s = sum_v e_v,  e_v = exp(k u_v)          Z_t = sum_v exp(k w_v)
    E   = sum_v e_v u_v                          A   = sum_v e_v (u_v - w_v)
re-centred whenever a block raises a maximum (online softmax). Then
    KL(q || p) = k A / Z_s - log Z_s + log Z_t,      H(q) = log Z_s - k E / Z_s,
    log q(y) = k (s_y - c_s) - log Z_s,              log p(y) = k (t_y - c_t) - log Z_t.
Centring on the raw maxima makes every exponent k u_v <= 0 and the largest exactly 0 at any scale: no
finite stand-in for -inf, and no rescale factor that overflows, so rows entirely below -3e38 or with a
maximum near the float32 limit stay finite. Terms with e_v = 0 count 0, so a column that is -inf in both
models contributes 0, never NaN. The row statistics (c_s, log Z_s, c_t, log Z_t) are kept for the
backward kernel, which writes in one pass
    grad_v = k (q_v (a (log q_v - log p_v - KL) - b - c (log q_v + H)) + b [v == y])
with a = dL/dKL, b = dL/dlog q(y), c = dL/dH per row.

Dtypes: student and teacher may differ; each is loaded in its own dtype. Per-element arithmetic is in
``ACC_DTYPE``, float64 if either input is float64, else float32. The sums Z_s, Z_t, E, A are float64 in
both cases (each block's terms are summed in float64: float32 block sums round at the scale of their
largest term and cost up to 4e-7 relative on peaked rows); k reaches the kernels in float64.

Rows: the logits come as ``[n_outer, rows_per_outer, V]`` views (``reverse_kld.row_view``), each with its own
strides: row r starts at (r // rows_per_outer) * outer_stride + (r % rows_per_outer) * inner_stride (``_row_offset``,
once per program). The gradient is written contiguous, [N, V_s].

Targets: an unmasked row whose target is outside [0, vocab_size) gets NaN log-probabilities (its KL and
entropy as usual) and, in the backward, no one-hot b [v == y]; its -b q_v term stays (log q(y) = k s_y - lse(k s):
the lse part exists for any id). No load ever leaves the row. Masked rows are not read and may hold any id.

Memory traffic per row of V columns: forward reads s and t once (2V elements), backward reads s and t
once and writes the gradient once (3V elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm_kernels.ops.triton_common import (
    _acc_dtype, _block_size, _centre, _num_warps, _online_log_normaliser, _recentred_moment, _round_to_bfloat16,
    _row_offset, _row_strides,
)
from minillm_kernels.reference import compute_dtype


@triton.jit
def _reverse_kld_forward_kernel(
    student_ptr, teacher_ptr, target_ptr, mask_ptr,
    kl_ptr, student_logprob_ptr, teacher_logprob_ptr, entropy_ptr, row_stats_ptr,
    student_rows_per_outer, student_outer_stride, student_inner_stride,
    teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride, vocab_size, inv_temperature: tl.float64,
    HAS_TARGET: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # int64 row index: the row offsets pass 2^31 once N * V does (16k tokens x 152k vocab).
    row = tl.program_id(0).to(tl.int64)
    student_ptr += _row_offset(row, student_rows_per_outer, student_outer_stride, student_inner_stride)
    teacher_ptr += _row_offset(row, teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride)
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0)  # a masked row reads nothing
    k64 = tl.zeros((), tl.float64) + inv_temperature
    k = k64.to(ACC_DTYPE)

    m_s = tl.full((), float("-inf"), ACC_DTYPE)  # running maxima
    m_t = tl.full((), float("-inf"), ACC_DTYPE)
    z_s = tl.zeros((), tl.float64)
    z_t = tl.zeros((), tl.float64)
    e_acc = tl.zeros((), tl.float64)
    a_acc = tl.zeros((), tl.float64)
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        s = tl.load(student_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        z_s_before = z_s
        m_t, c_t, z_t, _, d_t, _ = _online_log_normaliser(m_t, z_t, t, k64, k)
        m_s, c_s, z_s, e, d_s, r_s = _online_log_normaliser(m_s, z_s, s, k64, k)
        # Re-centre E and A: w -> w + d_t takes d_t Z_s from A; u -> u + d_s and e_v -> r e_v take both to
        # r (. + d_s Z_s).
        a_acc = tl.where(z_s_before > 0, a_acc - d_t * z_s_before, a_acc)
        a_acc = _recentred_moment(a_acc, z_s_before, d_s, r_s)
        e_acc = _recentred_moment(e_acc, z_s_before, d_s, r_s)

        u = s - c_s  # <= 0
        w = t - c_t
        live = e > 0
        e_acc += tl.sum(tl.where(live, e * u, 0.0).to(tl.float64), axis=0)
        a_acc += tl.sum(tl.where(live, e * (u - w), 0.0).to(tl.float64), axis=0)

    c_s = _centre(m_s).to(tl.float64)
    c_t = _centre(m_t).to(tl.float64)
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    kl = k64 * a_acc / z_s - log_z_s + log_z_t
    entropy = log_z_s - k64 * e_acc / z_s
    tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
    tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))
    tl.store(row_stats_ptr + 4 * row + 0, tl.where(valid, c_s, 0.0))
    tl.store(row_stats_ptr + 4 * row + 1, tl.where(valid, log_z_s, 0.0))
    tl.store(row_stats_ptr + 4 * row + 2, tl.where(valid, c_t, 0.0))
    tl.store(row_stats_ptr + 4 * row + 3, tl.where(valid, log_z_t, 0.0))
    if HAS_TARGET:
        target = tl.load(target_ptr + row)  # masked rows may hold ignore ids; out-of-range ids are never loaded
        in_range = valid & (target >= 0) & (target < vocab_size)
        column = tl.where(in_range, target, 0)
        s_y = tl.load(student_ptr + column, mask=in_range, other=0.0).to(tl.float64)
        t_y = tl.load(teacher_ptr + column, mask=in_range, other=0.0).to(tl.float64)
        student_logprob = tl.where(in_range, k64 * (s_y - c_s) - log_z_s, float("nan"))
        teacher_logprob = tl.where(in_range, k64 * (t_y - c_t) - log_z_t, float("nan"))
        tl.store(student_logprob_ptr + row, tl.where(valid, student_logprob, 0.0))
        tl.store(teacher_logprob_ptr + row, tl.where(valid, teacher_logprob, 0.0))


@triton.jit
def _reverse_kld_backward_kernel(
    student_ptr, teacher_ptr, target_ptr, mask_ptr,
    grad_kl_ptr, grad_student_logprob_ptr, grad_entropy_ptr,
    kl_ptr, entropy_ptr, row_stats_ptr, grad_student_ptr,
    student_rows_per_outer, student_outer_stride, student_inner_stride,
    teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride, student_width, vocab_size,
    inv_temperature: tl.float64,
    HAS_TARGET: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: see the forward kernel
    student_ptr += _row_offset(row, student_rows_per_outer, student_outer_stride, student_inner_stride)
    teacher_ptr += _row_offset(row, teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride)
    grad_student_ptr += row * student_width
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0)  # a masked row reads nothing and gets a zero gradient
    k = (tl.zeros((), tl.float64) + inv_temperature).to(ACC_DTYPE)

    a = tl.load(grad_kl_ptr + row).to(ACC_DTYPE)
    c = tl.load(grad_entropy_ptr + row).to(ACC_DTYPE)
    kl = tl.load(kl_ptr + row).to(ACC_DTYPE)
    entropy = tl.load(entropy_ptr + row).to(ACC_DTYPE)
    c_s = tl.load(row_stats_ptr + 4 * row + 0).to(ACC_DTYPE)
    log_z_s = tl.load(row_stats_ptr + 4 * row + 1).to(ACC_DTYPE)
    c_t = tl.load(row_stats_ptr + 4 * row + 2).to(ACC_DTYPE)
    log_z_t = tl.load(row_stats_ptr + 4 * row + 3).to(ACC_DTYPE)
    if HAS_TARGET:
        target = tl.load(target_ptr + row)
        # b counts wherever there is a target (its -b q_v term); the one-hot only for an id in the vocabulary.
        in_range = valid & (target >= 0) & (target < vocab_size)
        b = tl.load(grad_student_logprob_ptr + row).to(ACC_DTYPE)
        target = tl.where(in_range, target, -1)
    else:
        b = 0.0
        target = -1
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, student_width, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        s = tl.load(student_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        log_q = (s - c_s) * k - log_z_s
        log_p = (t - c_t) * k - log_z_t
        q = tl.exp(log_q)
        # The differences before the products (as the CPU kernel): where q_v > 0 they are small, while log p_v and
        # KL alone reach ~1e38 at logits ~4e37, where a (-log p_v) and a KL overflow float32 (inf - inf: NaN).
        grad = tl.where(q > 0, q * (a * ((log_q - log_p) - kl) - b - c * (log_q + entropy)), 0.0)
        grad = (grad + tl.where(cols == target, b, 0.0)) * k
        if grad_student_ptr.dtype.element_ty == tl.bfloat16:
            grad = _round_to_bfloat16(grad)
        tl.store(grad_student_ptr + cols, grad, mask=cols < student_width)


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    vocab_size: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel on ``[n_outer, rows_per_outer, V]`` logits (each its own split and strides):
    ``(kl, student_logprob, teacher_logprob, entropy, row_stats)``, of the N rows."""
    n_rows = student.shape[0] * student.shape[1]
    stats_dtype = compute_dtype(student.dtype, teacher.dtype)
    kl, student_logprob, teacher_logprob, entropy = (
        student.new_zeros(n_rows, dtype=stats_dtype) for _ in range(4)
    )
    row_stats = student.new_empty(n_rows, 4, dtype=stats_dtype)
    block_v = _block_size(vocab_size)
    _reverse_kld_forward_kernel[(n_rows,)](
        student, teacher, target if target is not None else kl, mask if mask is not None else kl,
        kl, student_logprob, teacher_logprob, entropy, row_stats,
        *_row_strides(student), *_row_strides(teacher), vocab_size, inv_temperature,
        HAS_TARGET=target is not None, HAS_MASK=mask is not None, BLOCK_V=block_v,
        ACC_DTYPE=_acc_dtype(student, teacher), num_warps=_num_warps(block_v),
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
    """Launch the backward kernel: the gradient with respect to ``student``, ``[N, V_s]`` contiguous."""
    n_rows, student_width = student.shape[0] * student.shape[1], student.shape[2]
    grad_student = torch.empty((n_rows, student_width), dtype=student.dtype, device=student.device)
    block_v = _block_size(vocab_size)
    _reverse_kld_backward_kernel[(n_rows,)](
        student, teacher, target if target is not None else kl, mask if mask is not None else kl,
        grad_kl, grad_student_logprob, grad_entropy, kl, entropy, row_stats, grad_student,
        *_row_strides(student), *_row_strides(teacher), student_width, vocab_size, inv_temperature,
        HAS_TARGET=target is not None, HAS_MASK=mask is not None, BLOCK_V=block_v,
        ACC_DTYPE=_acc_dtype(student, teacher), num_warps=_num_warps(block_v),
    )
    return grad_student
