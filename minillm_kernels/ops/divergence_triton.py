"""Triton kernels of the divergence family beside the reverse KL: two streaming passes per row forward, one backward.

Per row (token), over the first ``vocab_size`` columns, with k = 1/T, q = softmax(k s), p = softmax(k t):
    forward_kl        KL(p || q) = sum_v p_v (log p_v - log q_v)
    jsd               beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q
    skew_forward_kl   KL(p || m),   m = alpha p + (1 - alpha) q
    skew_reverse_kl   KL(q || m),   m = alpha q + (1 - alpha) p
    tvd               1/2 sum_v |p_v - q_v|
terms whose leading probability is 0 counting 0 (the reverse KL has its own one-pass kernels, ``reverse_kld_triton``).
The same algorithm as the CPU kernel (``csrc/cpu/divergence_kernel.h``), column for column:

Pass 1 streams the row for both log-normalisers (online softmax: running maxima c_s, c_t of the raw logits and
Z_s = sum_v exp(k (s_v - c_s)), Z_t likewise, re-centred when a block raises a maximum; float64 sums). Pass 2 evaluates
each column from them,
    log q_v = k (s_v - c_s) - log Z_s,   log p_v = k (t_v - c_t) - log Z_t,
    delta_v = log p_v - log q_v = k ((t_v - c_t) - (s_v - c_s)) - (log Z_t - log Z_s)   (raw differences first),
each row constant subtracted as a float pair, the subtraction's rounding error kept (``_row_constants``), and for a
mixture m = w p + (1 - w) q (w the teacher's weight: beta, alpha, or 1 - alpha for the skew reverse KL)
    log(m_v / q_v) = L(delta_v; w),   log(m_v / p_v) = L(-delta_v; 1 - w),   L(d; w) = log((1 - w) + w e^d)
(``triton_common._log_mixture``: log1p / expm1 forms, none rounding 1 - w to a float); then adds up the value's terms
(each in float64) and ``mean_partial = sum_v q_v a_v`` (a_v = dD/dq_v; q_v a_v is finite):
    forward_kl -p;  jsd (1 - beta) q log(q / m);  skew_forward_kl -p (1 - alpha p / m);
    skew_reverse_kl q (log(q / m) + 1 - alpha q / m);  tvd 1/2 q sign(q - p) (0 at q = p).
The backward writes in one pass grad_v = g k (q_v a_v - q_v mean_partial), from the saved row statistics
(c_s, log Z_s, c_t, log Z_t) and mean_partial.

Dtypes and rows as in ``reverse_kld_triton``: each input loaded in its own dtype, per-element arithmetic in
``ACC_DTYPE`` (float64 if either input is float64, else float32), row sums in float64, the gradient in the student's
dtype (bfloat16 rounded to nearest even); ``[n_outer, rows_per_outer, V]`` row views with any strides; masked rows are
not read and get 0. Memory traffic per row of V columns: forward reads s and t twice (4V elements), backward reads
them once and writes the gradient once (3V).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm_kernels.ops.triton_common import (
    _acc_dtype, _block_size, _centre, _difference, _log_mixture, _num_warps, _online_log_normaliser,
    _round_to_bfloat16, _row_offset, _row_strides, _split,
)
from minillm_kernels.reference import compute_dtype

# The kernels' DIVERGENCE flag, by name (the order of ops/divergence.py's KERNEL_DIVERGENCES).
FORWARD_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL, TVD = range(5)
DIVERGENCE_CODES = {"forward_kl": FORWARD_KL, "jsd": JSD, "skew_forward_kl": SKEW_FORWARD_KL,
                    "skew_reverse_kl": SKEW_REVERSE_KL, "tvd": TVD}


@triton.jit
def _row_constants(c_s64, log_z_s64, c_t64, log_z_t64, ACC_DTYPE: tl.constexpr):
    """A row's statistics (float64) as ``_columns`` takes them: the centres c_s, c_t rounded to ``ACC_DTYPE``, and as
    pairs hi + lo (``_split``) log Z_s, log Z_t and gap = log Z_t - log Z_s, so that
    delta_v = log p_v - log q_v = k ((t_v - c_t) - (s_v - c_s)) - gap. Each column's log-probability is then its
    centred logit times k minus a row constant (and delta_v a difference minus one): with the constant a float32, that
    subtraction would round alike in every column of a binade and shift the whole row, up to half an ulp of log Z
    (5e-7 of the result at V = 32000, 1e-5 of a KL near 0.05: a student near its teacher); the pair's low part and
    the subtraction's exact error (``_difference``) are carried as a second term instead."""
    log_z_s, log_z_s_lo = _split(log_z_s64, ACC_DTYPE)
    log_z_t, log_z_t_lo = _split(log_z_t64, ACC_DTYPE)
    gap, gap_lo = _split(log_z_t64 - log_z_s64, ACC_DTYPE)
    return c_s64.to(ACC_DTYPE), log_z_s, log_z_s_lo, c_t64.to(ACC_DTYPE), log_z_t, log_z_t_lo, gap, gap_lo


@triton.jit
def _columns(s, t, c_s, log_z_s, log_z_s_lo, c_t, log_z_t, log_z_t_lo, gap, gap_lo, k, coefficient, teacher_weight,
             DIVERGENCE: tl.constexpr):
    """``(q_v, D's term, q_v a_v)`` of a block of columns, from the raw logits s, t (in the accumulation dtype), the
    row's constants (``_row_constants``) and k; ``coefficient`` and ``teacher_weight`` float64 scalars (rounded here
    once each, 1 - coefficient too). Every lane finite or 0 where its leading probability is 0."""
    u = s - c_s
    w = t - c_t
    log_q, log_q_lo = _difference(u * k, log_z_s, log_z_s_lo)
    log_p, log_p_lo = _difference(w * k, log_z_t, log_z_t_lo)
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    q = q + q * log_q_lo  # exp(hi + lo) = exp(hi) (1 + lo) to second order in lo (a few ulps of hi)
    p = p + p * log_p_lo
    q_live = q > 0
    p_live = p > 0
    # log p - log q from the raw differences where both logits are finite (+-inf where one is -inf).
    finite = (s > float("-inf")) & (t > float("-inf"))
    delta, delta_lo = _difference((w - u) * k, gap, gap_lo)
    delta = tl.where(finite, delta, log_p - log_q)
    delta_lo = tl.where(finite, delta_lo, 0.0)
    if DIVERGENCE == 0:  # FORWARD_KL
        value = tl.where(p_live, p.to(tl.float64) * (delta.to(tl.float64) + delta_lo), 0.0)
        partial = -p
    elif DIVERGENCE == 4:  # TVD
        sign = (q > p).to(q.dtype) - (q < p).to(q.dtype)
        value = 0.5 * tl.abs(p - q)
        partial = 0.5 * q * sign
    else:
        # The mixture m = w p + (1 - w) q: log(m / q) = L(delta; w), log(m / p) = L(-delta; 1 - w) (``_log_mixture``),
        # each L + correction; the value's terms in float64, where the correction is not lost (a value near 0.03 is a
        # sum of terms of both signs ~10x larger: a float32 rounding of each term's logarithm is 1e-7 of it).
        if DIVERGENCE == 1:  # JSD
            log_m_over_q, q_correction = _log_mixture(delta, delta_lo, teacher_weight)
            log_m_over_p, p_correction = _log_mixture(-delta, -delta_lo, 1.0 - teacher_weight)
            q_term = tl.where(q_live, -q.to(tl.float64) * (log_m_over_q.to(tl.float64) + q_correction), 0.0)
            p_term = tl.where(p_live, -p.to(tl.float64) * (log_m_over_p.to(tl.float64) + p_correction), 0.0)
            value = coefficient * p_term + (1.0 - coefficient) * q_term
            partial = ((1.0 - coefficient) * q_term).to(q.dtype)
        elif DIVERGENCE == 2:  # SKEW_FORWARD_KL
            log_m_over_p, correction = _log_mixture(-delta, -delta_lo, 1.0 - teacher_weight)
            value = tl.where(p_live, -p.to(tl.float64) * (log_m_over_p.to(tl.float64) + correction), 0.0)
            alpha = coefficient.to(q.dtype)
            partial = tl.where(p_live, -p * (1.0 - alpha * tl.exp(-(log_m_over_p + correction))), 0.0)
        else:  # SKEW_REVERSE_KL
            log_m_over_q, correction = _log_mixture(delta, delta_lo, teacher_weight)
            log_q_over_m = -(log_m_over_q + correction)
            value = tl.where(q_live, -q.to(tl.float64) * (log_m_over_q.to(tl.float64) + correction), 0.0)
            alpha = coefficient.to(q.dtype)
            partial = tl.where(q_live, q * (log_q_over_m + 1.0 - alpha * tl.exp(log_q_over_m)), 0.0)
    return q, value, partial


@triton.jit
def _divergence_forward_kernel(
    student_ptr, teacher_ptr, mask_ptr, value_ptr, mean_partial_ptr, row_stats_ptr,
    student_rows_per_outer, student_outer_stride, student_inner_stride,
    teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride, vocab_size,
    coefficient: tl.float64, teacher_weight: tl.float64, inv_temperature: tl.float64,
    DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr,
    GIVEN_STATS: tl.constexpr,
):
    # int64 row index: the row offsets pass 2^31 once N * V does (16k tokens x 152k vocab).
    row = tl.program_id(0).to(tl.int64)
    student_ptr += _row_offset(row, student_rows_per_outer, student_outer_stride, student_inner_stride)
    teacher_ptr += _row_offset(row, teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride)
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0)  # a masked row reads nothing
    k64 = tl.zeros((), tl.float64) + inv_temperature
    k = k64.to(ACC_DTYPE)
    coefficient64 = tl.zeros((), tl.float64) + coefficient
    teacher_weight64 = tl.zeros((), tl.float64) + teacher_weight

    # Pass 1: the log-normalisers (online softmax, re-centred on the running maxima; float64 sums), unless given
    # (GIVEN_STATS: row_stats holds them on entry, e.g. a sharded vocabulary's global ones; pass 1 reads nothing).
    pass_1_cols = 0 if GIVEN_STATS else n_cols
    m_s = tl.full((), float("-inf"), ACC_DTYPE)
    m_t = tl.full((), float("-inf"), ACC_DTYPE)
    z_s = tl.zeros((), tl.float64)
    z_t = tl.zeros((), tl.float64)
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, pass_1_cols, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        s = tl.load(student_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        m_s, _, z_s, _, _, _ = _online_log_normaliser(m_s, z_s, s, k64, k)
        m_t, _, z_t, _, _, _ = _online_log_normaliser(m_t, z_t, t, k64, k)
    c_s64 = _centre(m_s).to(tl.float64)
    c_t64 = _centre(m_t).to(tl.float64)
    log_z_s64 = tl.log(z_s)
    log_z_t64 = tl.log(z_t)
    if GIVEN_STATS:
        c_s64 = tl.load(row_stats_ptr + 4 * row + 0).to(tl.float64)
        log_z_s64 = tl.load(row_stats_ptr + 4 * row + 1).to(tl.float64)
        c_t64 = tl.load(row_stats_ptr + 4 * row + 2).to(tl.float64)
        log_z_t64 = tl.load(row_stats_ptr + 4 * row + 3).to(tl.float64)

    # Pass 2: the value's terms and sum_v q_v a_v, column by column from the statistics.
    c_s, log_z_s, log_z_s_lo, c_t, log_z_t, log_z_t_lo, gap, gap_lo = _row_constants(
        c_s64, log_z_s64, c_t64, log_z_t64, ACC_DTYPE)
    total = tl.zeros((), tl.float64)
    partial = tl.zeros((), tl.float64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        s = tl.load(student_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        _, terms, partials = _columns(s, t, c_s, log_z_s, log_z_s_lo, c_t, log_z_t, log_z_t_lo, gap, gap_lo, k,
                                      coefficient64, teacher_weight64, DIVERGENCE)
        total += tl.sum(tl.where(in_row, terms, 0.0).to(tl.float64), axis=0)
        partial += tl.sum(tl.where(in_row, partials, 0.0).to(tl.float64), axis=0)
    # NaN logits make a log-normaliser NaN, and every q_v, p_v with it: the terms alone would drop them.
    nan_of_logits = (log_z_s64 - log_z_s64) + (log_z_t64 - log_z_t64)
    tl.store(value_ptr + row, tl.where(valid, total + nan_of_logits, 0.0))
    tl.store(mean_partial_ptr + row, tl.where(valid, partial + nan_of_logits, 0.0))
    tl.store(row_stats_ptr + 4 * row + 0, tl.where(valid, c_s64, 0.0))
    tl.store(row_stats_ptr + 4 * row + 1, tl.where(valid, log_z_s64, 0.0))
    tl.store(row_stats_ptr + 4 * row + 2, tl.where(valid, c_t64, 0.0))
    tl.store(row_stats_ptr + 4 * row + 3, tl.where(valid, log_z_t64, 0.0))


@triton.jit
def _divergence_backward_kernel(
    student_ptr, teacher_ptr, mask_ptr, grad_divergence_ptr, mean_partial_ptr, row_stats_ptr, grad_student_ptr,
    student_rows_per_outer, student_outer_stride, student_inner_stride,
    teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride, student_width, vocab_size,
    coefficient: tl.float64, teacher_weight: tl.float64, inv_temperature: tl.float64,
    DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: see the forward kernel
    student_ptr += _row_offset(row, student_rows_per_outer, student_outer_stride, student_inner_stride)
    teacher_ptr += _row_offset(row, teacher_rows_per_outer, teacher_outer_stride, teacher_inner_stride)
    grad_student_ptr += row * student_width
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0)  # a masked row reads nothing and gets a zero gradient
    k = (tl.zeros((), tl.float64) + inv_temperature).to(ACC_DTYPE)
    coefficient64 = tl.zeros((), tl.float64) + coefficient
    teacher_weight64 = tl.zeros((), tl.float64) + teacher_weight
    scale = tl.load(grad_divergence_ptr + row).to(ACC_DTYPE) * k
    mean = tl.load(mean_partial_ptr + row).to(ACC_DTYPE)
    c_s, log_z_s, log_z_s_lo, c_t, log_z_t, log_z_t_lo, gap, gap_lo = _row_constants(
        tl.load(row_stats_ptr + 4 * row + 0).to(tl.float64), tl.load(row_stats_ptr + 4 * row + 1).to(tl.float64),
        tl.load(row_stats_ptr + 4 * row + 2).to(tl.float64), tl.load(row_stats_ptr + 4 * row + 3).to(tl.float64),
        ACC_DTYPE)
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, student_width, BLOCK_V):
        cols = start + offsets
        in_row = cols < n_cols
        s = tl.load(student_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        q, _, partials = _columns(s, t, c_s, log_z_s, log_z_s_lo, c_t, log_z_t, log_z_t_lo, gap, gap_lo, k,
                                  coefficient64, teacher_weight64, DIVERGENCE)
        grad = tl.where(in_row, scale * (partials - q * mean), 0.0)
        if grad_student_ptr.dtype.element_ty == tl.bfloat16:
            grad = _round_to_bfloat16(grad)
        tl.store(grad_student_ptr + cols, grad, mask=cols < student_width)


def _coefficients(divergence: str, coefficient: float) -> tuple[int, float, float]:
    """``(DIVERGENCE flag, coefficient, teacher weight w of the mixture m = w p + (1 - w) q)``."""
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence (triton): must be one of {tuple(DIVERGENCE_CODES)} (the reverse KL has its own "
                         f"kernel), got {divergence!r}")
    code = DIVERGENCE_CODES[divergence]
    if code in (JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL) and not 0 < coefficient < 1:
        raise ValueError(f"divergence (triton): {divergence} needs a coefficient (beta or skew) in (0, 1), got "
                         f"{coefficient}")
    return code, float(coefficient), 1.0 - coefficient if code == SKEW_REVERSE_KL else float(coefficient)


def forward(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, divergence: str, coefficient: float,
    inv_temperature: float, vocab_size: int, given_row_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on ``[n_outer, rows_per_outer, V]`` logits (each its own split and strides):
    ``(divergence [N], mean_partial [N], row_stats [N, 4])`` in the accumulation dtype (the CPU kernel's outputs).
    ``given_row_stats`` ``[N, 4]``: pass 1 skipped, the terms from those statistics (returned as row_stats)."""
    code, coefficient, teacher_weight = _coefficients(divergence, coefficient)
    n_rows = student.shape[0] * student.shape[1]
    stats_dtype = compute_dtype(student.dtype, teacher.dtype)
    value = student.new_empty(n_rows, dtype=stats_dtype)
    mean_partial = student.new_empty(n_rows, dtype=stats_dtype)
    row_stats = student.new_empty(n_rows, 4, dtype=stats_dtype) if given_row_stats is None else \
        given_row_stats.to(stats_dtype, copy=True).contiguous()
    block_v = _block_size(vocab_size)
    _divergence_forward_kernel[(n_rows,)](
        student, teacher, mask if mask is not None else value, value, mean_partial, row_stats,
        *_row_strides(student), *_row_strides(teacher), vocab_size, coefficient, teacher_weight, inv_temperature,
        DIVERGENCE=code, HAS_MASK=mask is not None, BLOCK_V=block_v, ACC_DTYPE=_acc_dtype(student, teacher),
        GIVEN_STATS=given_row_stats is not None, num_warps=_num_warps(block_v),
    )
    return value, mean_partial, row_stats


def backward(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, grad_divergence: torch.Tensor,
    mean_partial: torch.Tensor, row_stats: torch.Tensor, divergence: str, coefficient: float,
    inv_temperature: float, vocab_size: int,
) -> torch.Tensor:
    """Launch the backward kernel: the gradient of ``sum_i g_i D_i`` with respect to ``student``, ``[N, V_s]``
    contiguous in the student's dtype (0 past ``vocab_size`` and in masked rows)."""
    code, coefficient, teacher_weight = _coefficients(divergence, coefficient)
    n_rows, student_width = student.shape[0] * student.shape[1], student.shape[2]
    grad_student = torch.empty((n_rows, student_width), dtype=student.dtype, device=student.device)
    block_v = _block_size(vocab_size)
    _divergence_backward_kernel[(n_rows,)](
        student, teacher, mask if mask is not None else mean_partial, grad_divergence, mean_partial, row_stats,
        grad_student, *_row_strides(student), *_row_strides(teacher), student_width, vocab_size, coefficient,
        teacher_weight, inv_temperature,
        DIVERGENCE=code, HAS_MASK=mask is not None, BLOCK_V=block_v, ACC_DTYPE=_acc_dtype(student, teacher),
        num_warps=_num_warps(block_v),
    )
    return grad_student
