"""Triton kernels of the sparse teacher: one program per row, the CPU kernel's algorithm (``csrc/cpu/sparse_kernel.h``).

Per row, with k = 1/T over the first ``vocab_size`` = V student columns and the K teacher entries (id, log p), live
where log p > -inf (I = their ids, K' = |I|, R the other columns; docs/design.md, "The sparse teacher"):

Pass 1 streams the row with the columns of I excluded (each block's columns compared with the row's sorted entry
columns that fall in the block, ``_outside_entries``): the online maximum c_R of R and, re-centred when it grows,
Z_R = sum_R exp(k (s_v - c_R)) and E_R = sum_R exp(k (s_v - c_R)) (s_v - c_R) (float64 sums). The entries' loops then
gather their logits x_i and give, with no subtraction of sums,
    c = the row's largest logit,  Z = Z_R e^{k (c_R - c)} + sum_I e^{k (x_i - c)},  log q_v = k (s_v - c) - log Z,
    log Q_R = k (c_R - c) + log Z_R - log Z,  H = log Z - k E / Z,  P_I = sum_I p_i (float64),  P_R = max(1 - P_I, 0),
and the value and M = sum_o q_o a_o over the outcomes of the tail mode:
    bin           the entries and the tail outcome (log P_R, log Q_R)
    uniform       the entries and every column of R against log pi = log(P_R / (V - K')): pass 2 over R
    renormalized  the entries, log p^ = log p - lse(log p_I), log q^ = k (x - c_I) - log Z_I (R not read)
The backward writes the R columns of each block (bin: (q_v / Q_R) qa_R - q_v M, q_v / Q_R = exp(k (s_v - c_R) -
log Z_R); uniform: the column's qa - q_v M; renormalized: 0) plus the token statistics' terms, and the entries'
columns from the entries' loop: every column once (the block store skips I), padding and masked rows 0.

Dtypes as in ``divergence_triton``: each input loaded in its own dtype (ids int32 or int64), per-element arithmetic
in ``ACC_DTYPE`` (float64 if the student or the log-probabilities are float64), sums and row formulas in float64, the
gradient in the student's dtype (bfloat16 rounded to nearest even); ``[n_outer, rows_per_outer, V]`` student row
views; masked rows are not read and get 0. A live id outside [0, V) makes its row NaN; no load leaves the row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm_kernels.ops.triton_common import (
    _block_size, _centre, _log_mixture, _num_warps, _online_log_normaliser, _recentred_moment, _round_to_bfloat16,
    _row_offset, _row_strides,
)
from minillm_kernels.reference import DIVERGENCES, SPARSE_TAILS, compute_dtype

# The kernels' DIVERGENCE and TAIL flags: the index of the name in reference.DIVERGENCES / reference.SPARSE_TAILS.
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}
TAIL_CODES = {name: code for code, name in enumerate(SPARSE_TAILS)}
NO_COLUMN = tl.constexpr(2**31 - 1)  # the sorted entry columns' stand-in for a dead entry: above every column
ID_CHUNK = 16  # entry columns compared with a block's columns at a time


@triton.jit
def _outcome(log_p, log_q, coefficient, teacher_weight, DIVERGENCE: tl.constexpr):
    """``(term, q a)`` of outcomes with log-probabilities ``log_p`` (teacher) and ``log_q`` (student): the divergence
    table of docs/design.md, a term whose leading probability is 0 counting 0; the mixtures' logarithms as in
    ``divergence_triton._columns`` (``teacher_weight`` a float64 scalar)."""
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    p_live = p > 0
    q_live = q > 0
    delta = log_p - log_q
    if DIVERGENCE == 0:  # reverse KL
        term = tl.where(q_live, -q * delta, 0.0)
        qa = tl.where(q_live, q * (1.0 - delta), 0.0)
    elif DIVERGENCE == 1:  # forward KL
        term = tl.where(p_live, p * delta, 0.0)
        qa = -p
    elif DIVERGENCE == 5:  # TVD
        sign = (q > p).to(q.dtype) - (q < p).to(q.dtype)
        term = 0.5 * tl.abs(p - q)
        qa = 0.5 * q * sign
    else:
        # log(m / q) = L(delta; w), log(m / p) = L(-delta; 1 - w) (``_log_mixture``; delta has no low part here).
        if DIVERGENCE == 2:  # JSD
            log_m_over_q, _ = _log_mixture(delta, 0.0, teacher_weight)
            log_m_over_p, _ = _log_mixture(-delta, 0.0, 1.0 - teacher_weight)
            log_q_over_m = -log_m_over_q
            log_p_over_m = -log_m_over_p
            q_term = tl.where(q_live, q * log_q_over_m, 0.0)
            term = coefficient * tl.where(p_live, p * log_p_over_m, 0.0) + (1.0 - coefficient) * q_term
            qa = (1.0 - coefficient) * q_term
        elif DIVERGENCE == 3:  # skew forward KL
            log_m_over_p, _ = _log_mixture(-delta, 0.0, 1.0 - teacher_weight)
            log_p_over_m = -log_m_over_p
            term = tl.where(p_live, p * log_p_over_m, 0.0)
            qa = tl.where(p_live, -p * (1.0 - coefficient * tl.exp(log_p_over_m)), 0.0)
        else:  # skew reverse KL
            log_m_over_q, _ = _log_mixture(delta, 0.0, teacher_weight)
            log_q_over_m = -log_m_over_q
            term = tl.where(q_live, q * log_q_over_m, 0.0)
            qa = tl.where(q_live, q * (log_q_over_m + 1.0 - coefficient * tl.exp(log_q_over_m)), 0.0)
    return term, qa


@triton.jit
def _count_below(sorted_ptr, n_entries, bound, K_BLOCK: tl.constexpr):
    """How many of the row's sorted entry columns lie below ``bound``."""
    count = tl.zeros((), tl.int32)
    offsets = tl.arange(0, K_BLOCK)
    for start in range(0, n_entries, K_BLOCK):
        j = start + offsets
        columns = tl.load(sorted_ptr + j, mask=j < n_entries, other=NO_COLUMN)
        count += tl.sum((columns < bound).to(tl.int32), axis=0)
    return count


@triton.jit
def _outside_entries(cols, sorted_ptr, first, last, ID_CHUNK: tl.constexpr):
    """Whether each of a block's columns is outside I: none of the sorted entry columns [first, last) (those below the
    block's end and not below its start) equals it."""
    hits = tl.zeros(cols.shape, tl.int32)
    chunk = tl.arange(0, ID_CHUNK)
    for start in range(first, last, ID_CHUNK):
        j = start + chunk
        entry = tl.load(sorted_ptr + j, mask=j < last, other=-1)
        hits = tl.maximum(hits, tl.max((cols[:, None] == entry[None, :]).to(tl.int32), axis=1))
    return hits == 0


@triton.jit
def _entries(ids_ptr, logprobs_ptr, student_ptr, j, n_entries, vocab_size, ACC_DTYPE: tl.constexpr):
    """A chunk ``j`` of the row's entries: ``(column, log p, the student's raw logit there, counts (live and in
    range), live but out of range)``; nothing is read past the row."""
    in_chunk = j < n_entries
    log_p = tl.load(logprobs_ptr + j, mask=in_chunk, other=float("-inf")).to(ACC_DTYPE)
    live = in_chunk & (log_p != float("-inf"))  # (NaN is live: its row is NaN)
    column = tl.load(ids_ptr + j, mask=in_chunk, other=0)
    in_range = (column >= 0) & (column < vocab_size)
    counts = live & in_range
    logit = tl.load(student_ptr + column, mask=counts, other=float("-inf")).to(ACC_DTYPE)
    return column, log_p, logit, counts, live & (~in_range)


@triton.jit
def _teacher_side(ids_ptr, logprobs_ptr, student_ptr, n_entries, vocab_size, ACC_DTYPE: tl.constexpr,
                  K_BLOCK: tl.constexpr):
    """The entries' row quantities: ``(largest logit of I, sum_I p (float64), K', out-of-range live ids, largest
    log p of I)``."""
    top = tl.full((), float("-inf"), ACC_DTYPE)
    top_log_p = tl.full((), float("-inf"), ACC_DTYPE)
    p_sum = tl.zeros((), tl.float64)
    n_live = tl.zeros((), tl.int32)
    n_bad = tl.zeros((), tl.int32)
    offsets = tl.arange(0, K_BLOCK)
    for start in range(0, n_entries, K_BLOCK):
        entries = _entries(ids_ptr, logprobs_ptr, student_ptr, start + offsets, n_entries, vocab_size, ACC_DTYPE)
        log_p, logit, counts, bad = entries[1], entries[2], entries[3], entries[4]
        top = tl.maximum(top, tl.max(tl.where(counts, logit, float("-inf")), axis=0))
        top_log_p = tl.maximum(top_log_p, tl.max(tl.where(counts, log_p, float("-inf")), axis=0))
        p_sum += tl.sum(tl.where(counts, tl.exp(log_p.to(tl.float64)), 0.0), axis=0)
        n_live += tl.sum(counts.to(tl.int32), axis=0)
        n_bad += tl.sum(bad.to(tl.int32), axis=0)
    return top, p_sum, n_live, n_bad, top_log_p


@triton.jit
def _entry_sums(ids_ptr, logprobs_ptr, student_ptr, n_entries, vocab_size, c, c_entries, top_log_p, k,
                ACC_DTYPE: tl.constexpr, K_BLOCK: tl.constexpr):
    """``(sum_I e^{k (x - c)}, sum_I e^{k (x - c)} (x - c), sum_I e^{k (x - c_I)}, sum_I e^{log p - max log p})``,
    float64."""
    z = tl.zeros((), tl.float64)
    e = tl.zeros((), tl.float64)
    z_entries = tl.zeros((), tl.float64)
    p_entries = tl.zeros((), tl.float64)
    offsets = tl.arange(0, K_BLOCK)
    for start in range(0, n_entries, K_BLOCK):
        entries = _entries(ids_ptr, logprobs_ptr, student_ptr, start + offsets, n_entries, vocab_size, ACC_DTYPE)
        log_p, logit, counts = entries[1], entries[2], entries[3]
        u = logit - c
        ex = tl.exp(u * k)
        z += tl.sum(tl.where(counts, ex, 0.0).to(tl.float64), axis=0)
        e += tl.sum(tl.where(counts & (ex > 0), ex * u, 0.0).to(tl.float64), axis=0)
        z_entries += tl.sum(tl.where(counts, tl.exp((logit - c_entries) * k), 0.0).to(tl.float64), axis=0)
        p_entries += tl.sum(tl.where(counts, tl.exp(log_p - top_log_p), 0.0).to(tl.float64), axis=0)
    return z, e, z_entries, p_entries


@triton.jit
def _sparse_forward_kernel(
    student_ptr, ids_ptr, logprobs_ptr, sorted_ptr, target_ptr, mask_ptr,
    value_ptr, student_logprob_ptr, entropy_ptr, mean_partial_ptr, row_stats_ptr,
    rows_per_outer, outer_stride, inner_stride, vocab_size, n_entries,
    coefficient: tl.float64, teacher_weight: tl.float64, inv_temperature: tl.float64,
    DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, STREAMED: tl.constexpr, HAS_TARGET: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, K_BLOCK: tl.constexpr, ID_CHUNK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # int64 row index: the row offsets pass 2^31 once N * V does (16k tokens x 152k vocab).
    row = tl.program_id(0).to(tl.int64)
    student_ptr += _row_offset(row, rows_per_outer, outer_stride, inner_stride)
    ids_ptr += row * n_entries
    logprobs_ptr += row * n_entries
    sorted_ptr += row * n_entries
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0) if STREAMED else 0  # a masked row reads nothing
    k_entries = tl.where(valid, n_entries, 0)
    k64 = tl.zeros((), tl.float64) + inv_temperature
    k = k64.to(ACC_DTYPE)
    coefficient_acc = (tl.zeros((), tl.float64) + coefficient).to(ACC_DTYPE)
    weight64 = tl.zeros((), tl.float64) + teacher_weight
    offsets = tl.arange(0, BLOCK_V)
    entry_offsets = tl.arange(0, K_BLOCK)

    # Pass 1 over R: the online maximum and the sums Z_R, E_R centred on it (I excluded: no subtraction later).
    m_r = tl.full((), float("-inf"), ACC_DTYPE)
    z_r = tl.zeros((), tl.float64)
    e_r = tl.zeros((), tl.float64)
    first = tl.zeros((), tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        last = _count_below(sorted_ptr, k_entries, start + BLOCK_V, K_BLOCK)
        keep = (cols < n_cols) & _outside_entries(cols, sorted_ptr, first, last, ID_CHUNK)
        first = last
        s = tl.load(student_ptr + cols, mask=keep, other=float("-inf")).to(ACC_DTYPE)
        z_r_before = z_r
        m_r, c_r, z_r, e, d, ratio = _online_log_normaliser(m_r, z_r, s, k64, k)
        e_r = _recentred_moment(e_r, z_r_before, d, ratio)
        e_r += tl.sum(tl.where(e > 0, e * (s - c_r), 0.0).to(tl.float64), axis=0)

    # The entries: the row's centre, log-normaliser and entropy; the teacher's tail mass.
    top, p_sum, n_live, n_bad, top_log_p = _teacher_side(ids_ptr, logprobs_ptr, student_ptr, k_entries, vocab_size,
                                                         ACC_DTYPE, K_BLOCK)
    c_r64 = _centre(m_r).to(tl.float64)
    c = _centre(tl.maximum(m_r, top))
    c64 = c.to(tl.float64)
    c_entries = _centre(top)
    z_i, e_i, z_entries, p_entries = _entry_sums(ids_ptr, logprobs_ptr, student_ptr, k_entries, vocab_size, c,
                                                 c_entries, top_log_p, k, ACC_DTYPE, K_BLOCK)
    tail_ratio = tl.exp(tl.minimum(c_r64 - c64, 0.0) * k64)
    z = tl.where(z_r == 0, 0.0, z_r * tail_ratio) + z_i  # (NaN stays NaN)
    e_sum = tl.where(z_r == 0, 0.0, tail_ratio * (e_r + (c_r64 - c64) * z_r)) + e_i
    log_z64 = tl.log(z)
    log_z_r64 = tl.log(z_r)
    entropy64 = log_z64 - k64 * e_sum / z
    log_tail_mass = tl.log(tl.where(n_live < vocab_size, tl.maximum(1.0 - p_sum, 0.0), 0.0))
    log_student_tail = tl.where(z_r == 0, float("-inf"), (c_r64 - c64) * k64 + log_z_r64 - log_z64)
    log_z = log_z64.to(ACC_DTYPE)
    log_z_entries = tl.log(z_entries).to(ACC_DTYPE)
    log_mass = (top_log_p.to(tl.float64) + tl.log(p_entries)).to(ACC_DTYPE)

    # The entries' outcomes (renormalized: on I alone), then the tail's.
    total = tl.zeros((), tl.float64)
    partial = tl.zeros((), tl.float64)
    for start in range(0, k_entries, K_BLOCK):
        entries = _entries(ids_ptr, logprobs_ptr, student_ptr, start + entry_offsets, k_entries, vocab_size,
                           ACC_DTYPE)
        log_p, logit, counts = entries[1], entries[2], entries[3]
        if TAIL == 2:
            term, qa = _outcome(log_p - log_mass, (logit - c_entries) * k - log_z_entries, coefficient_acc,
                                weight64, DIVERGENCE)
        else:
            term, qa = _outcome(log_p, (logit - c) * k - log_z, coefficient_acc, weight64, DIVERGENCE)
        total += tl.sum(tl.where(counts, term, 0.0).to(tl.float64), axis=0)
        partial += tl.sum(tl.where(counts, qa, 0.0).to(tl.float64), axis=0)
    has_tail = n_live < vocab_size
    if TAIL == 0:
        term, qa = _outcome(log_tail_mass.to(ACC_DTYPE), log_student_tail.to(ACC_DTYPE), coefficient_acc, weight64,
                            DIVERGENCE)
        total += tl.where(has_tail, term.to(tl.float64), 0.0)
        partial += tl.where(has_tail, qa.to(tl.float64), 0.0)
    if TAIL == 1:  # pass 2 over R, against the uniform completion
        log_pi = (log_tail_mass - tl.log(tl.maximum(vocab_size - n_live, 1).to(tl.float64))).to(ACC_DTYPE)
        first = tl.zeros((), tl.int32)
        for start in range(0, tl.where(has_tail, n_cols, 0), BLOCK_V):
            cols = start + offsets
            last = _count_below(sorted_ptr, k_entries, start + BLOCK_V, K_BLOCK)
            keep = (cols < n_cols) & _outside_entries(cols, sorted_ptr, first, last, ID_CHUNK)
            first = last
            s = tl.load(student_ptr + cols, mask=keep, other=float("-inf")).to(ACC_DTYPE)
            term, qa = _outcome(log_pi, (s - c) * k - log_z, coefficient_acc, weight64, DIVERGENCE)
            total += tl.sum(tl.where(keep, term, 0.0).to(tl.float64), axis=0)
            partial += tl.sum(tl.where(keep, qa, 0.0).to(tl.float64), axis=0)

    # NaN of the row: a NaN log-probability, a live id out of range, NaN in the student's logits the mode reads.
    nan_of_row = (p_sum - p_sum) + tl.where(n_bad > 0, float("nan"), 0.0)
    if TAIL == 2:
        nan_of_row += tl.where(n_live > 0, z_entries - z_entries, 0.0)
    else:
        nan_of_row += log_z64 - log_z64
    tl.store(value_ptr + row, tl.where(valid, total + nan_of_row, 0.0))
    tl.store(mean_partial_ptr + row, tl.where(valid, partial + nan_of_row, 0.0))
    if HAS_TARGET:
        target = tl.load(target_ptr + row)
        in_range = (target >= 0) & (target < vocab_size)
        logit_y = tl.load(student_ptr + target, mask=valid & in_range, other=0.0).to(tl.float64)
        logprob = tl.where(in_range, (logit_y - c64) * k64 - log_z64, float("nan"))
        tl.store(student_logprob_ptr + row, tl.where(valid, logprob, 0.0))
    else:
        tl.store(student_logprob_ptr + row, 0.0)
    tl.store(entropy_ptr + row, tl.where(valid & STREAMED, entropy64, 0.0))
    tl.store(row_stats_ptr + 4 * row + 0, tl.where(valid, c64, 0.0))
    tl.store(row_stats_ptr + 4 * row + 1, tl.where(valid, log_z64, 0.0))
    tl.store(row_stats_ptr + 4 * row + 2, tl.where(valid, c_r64, 0.0))
    tl.store(row_stats_ptr + 4 * row + 3, tl.where(valid, log_z_r64, 0.0))


@triton.jit
def _sparse_backward_kernel(
    student_ptr, ids_ptr, logprobs_ptr, sorted_ptr, target_ptr, mask_ptr,
    grad_value_ptr, grad_student_logprob_ptr, grad_entropy_ptr, entropy_ptr, mean_partial_ptr, row_stats_ptr,
    grad_student_ptr, rows_per_outer, outer_stride, inner_stride, student_width, vocab_size, n_entries,
    coefficient: tl.float64, teacher_weight: tl.float64, inv_temperature: tl.float64,
    DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, STREAMED: tl.constexpr, HAS_TARGET: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, K_BLOCK: tl.constexpr, ID_CHUNK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: see the forward kernel
    student_ptr += _row_offset(row, rows_per_outer, outer_stride, inner_stride)
    ids_ptr += row * n_entries
    logprobs_ptr += row * n_entries
    sorted_ptr += row * n_entries
    grad_student_ptr += row * student_width
    valid = tl.load(mask_ptr + row) != 0 if HAS_MASK else True
    n_cols = tl.where(valid, vocab_size, 0)  # a masked row reads nothing and gets a zero gradient
    k_entries = tl.where(valid, n_entries, 0)
    k64 = tl.zeros((), tl.float64) + inv_temperature
    k = k64.to(ACC_DTYPE)
    coefficient_acc = (tl.zeros((), tl.float64) + coefficient).to(ACC_DTYPE)
    weight64 = tl.zeros((), tl.float64) + teacher_weight
    offsets = tl.arange(0, BLOCK_V)
    entry_offsets = tl.arange(0, K_BLOCK)
    g = tl.load(grad_value_ptr + row).to(ACC_DTYPE)
    mean = tl.load(mean_partial_ptr + row).to(ACC_DTYPE)
    c = tl.load(row_stats_ptr + 4 * row + 0).to(ACC_DTYPE)
    log_z64 = tl.load(row_stats_ptr + 4 * row + 1).to(tl.float64)
    c_r = tl.load(row_stats_ptr + 4 * row + 2).to(ACC_DTYPE)
    log_z_r64 = tl.load(row_stats_ptr + 4 * row + 3).to(tl.float64)
    log_z = log_z64.to(ACC_DTYPE)
    if HAS_TARGET:  # the token statistics: b = dL/dlog q(y), c = dL/dH
        b = tl.load(grad_student_logprob_ptr + row).to(ACC_DTYPE)
        grad_h = tl.load(grad_entropy_ptr + row).to(ACC_DTYPE)
        entropy = tl.load(entropy_ptr + row).to(ACC_DTYPE)
        target = tl.load(target_ptr + row)
    else:
        b = tl.zeros((), ACC_DTYPE)
        grad_h = tl.zeros((), ACC_DTYPE)
        entropy = tl.zeros((), ACC_DTYPE)
        target = -1

    teacher = _teacher_side(ids_ptr, logprobs_ptr, student_ptr, k_entries, vocab_size, ACC_DTYPE, K_BLOCK)
    top, p_sum, n_live, top_log_p = teacher[0], teacher[1], teacher[2], teacher[4]
    c_entries = _centre(top)
    sums = _entry_sums(ids_ptr, logprobs_ptr, student_ptr, k_entries, vocab_size, c, c_entries, top_log_p, k,
                       ACC_DTYPE, K_BLOCK)
    z_entries, p_entries = sums[2], sums[3]
    log_z_entries = tl.log(z_entries).to(ACC_DTYPE)
    log_mass = (top_log_p.to(tl.float64) + tl.log(p_entries)).to(ACC_DTYPE)
    log_tail_mass = tl.log(tl.where(n_live < vocab_size, tl.maximum(1.0 - p_sum, 0.0), 0.0))
    has_tail = log_z_r64 != float("-inf")  # the student has mass on R
    log_student_tail = tl.where(has_tail, (c_r.to(tl.float64) - c.to(tl.float64)) * k64 + log_z_r64 - log_z64,
                                float("-inf"))
    tail_qa = _outcome(log_tail_mass.to(ACC_DTYPE), log_student_tail.to(ACC_DTYPE), coefficient_acc, weight64,
                       DIVERGENCE)[1]
    tail_qa = tl.where(has_tail, tail_qa, 0.0)
    log_z_r = tl.where(has_tail, log_z_r64, 0.0).to(ACC_DTYPE)
    log_pi = (log_tail_mass - tl.log(tl.maximum(vocab_size - n_live, 1).to(tl.float64))).to(ACC_DTYPE)

    # The columns of R (and the padding), block by block; the block store skips the columns of I.
    first = tl.zeros((), tl.int32)
    for start in range(0, student_width, BLOCK_V):
        cols = start + offsets
        last = _count_below(sorted_ptr, k_entries, start + BLOCK_V, K_BLOCK)
        in_vocab = cols < n_cols
        outside = _outside_entries(cols, sorted_ptr, first, last, ID_CHUNK)
        first = last
        tail = in_vocab & outside
        s = tl.load(student_ptr + cols, mask=tail & STREAMED, other=float("-inf")).to(ACC_DTYPE)
        log_q = (s - c) * k - log_z
        q = tl.exp(log_q)
        if TAIL == 0:
            grad = g * (tl.exp((s - c_r) * k - log_z_r) * tail_qa - q * mean)
        elif TAIL == 1:
            grad = g * (_outcome(log_pi, log_q, coefficient_acc, weight64, DIVERGENCE)[1] - q * mean)
        else:  # renormalized: the tail columns are not in the divergence
            grad = tl.zeros_like(q)
        if HAS_TARGET:
            grad += b * ((cols == target).to(ACC_DTYPE) - q) - grad_h * tl.where(q > 0, q * (log_q + entropy), 0.0)
        grad = tl.where(tail & STREAMED, grad * k, 0.0)
        if grad_student_ptr.dtype.element_ty == tl.bfloat16:
            grad = _round_to_bfloat16(grad)
        tl.store(grad_student_ptr + cols, grad, mask=(cols < student_width) & (outside | ~in_vocab))

    # The columns of I.
    for start in range(0, k_entries, K_BLOCK):
        entries = _entries(ids_ptr, logprobs_ptr, student_ptr, start + entry_offsets, k_entries, vocab_size,
                           ACC_DTYPE)
        column, log_p, logit, counts = entries[0], entries[1], entries[2], entries[3]
        log_q = (logit - c) * k - log_z
        q = tl.exp(log_q)
        if TAIL == 2:
            log_q_entries = (logit - c_entries) * k - log_z_entries
            qa = _outcome(log_p - log_mass, log_q_entries, coefficient_acc, weight64, DIVERGENCE)[1]
            grad = g * (qa - tl.exp(log_q_entries) * mean)
        else:
            qa = _outcome(log_p, log_q, coefficient_acc, weight64, DIVERGENCE)[1]
            grad = g * (qa - q * mean)
        if HAS_TARGET:
            grad += b * ((column == target).to(ACC_DTYPE) - q) - grad_h * tl.where(q > 0, q * (log_q + entropy), 0.0)
        grad = grad * k
        if grad_student_ptr.dtype.element_ty == tl.bfloat16:
            grad = _round_to_bfloat16(grad)
        tl.store(grad_student_ptr + column, grad, mask=counts)


def _launch_arguments(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      target: torch.Tensor | None, divergence: str, tail: str, coefficient: float,
                      vocab_size: int) -> tuple[torch.Tensor, dict]:
    """``(the rows' sorted entry columns [N, K] int32, the kernels' constexprs)``."""
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"sparse_divergence (triton): divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if tail not in TAIL_CODES:
        raise ValueError(f"sparse_divergence (triton): tail must be one of {SPARSE_TAILS}, got {tail!r}")
    if divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl") and not 0 < coefficient < 1:
        raise ValueError(f"sparse_divergence (triton): {divergence} needs a coefficient (beta or skew) in (0, 1), got "
                         f"{coefficient}")
    counted = (teacher_logprobs != float("-inf")) & (teacher_ids >= 0) & (teacher_ids < vocab_size)
    sorted_columns = torch.where(counted, teacher_ids, NO_COLUMN.value).to(torch.int32).sort(-1).values.contiguous()
    k = teacher_ids.shape[1]
    constexprs = dict(
        DIVERGENCE=DIVERGENCE_CODES[divergence], TAIL=TAIL_CODES[tail],
        STREAMED=tail != "renormalized" or target is not None, HAS_TARGET=target is not None,
        K_BLOCK=min(triton.next_power_of_2(k), 1024), ID_CHUNK=ID_CHUNK,
        ACC_DTYPE=tl.float64 if compute_dtype(student.dtype, teacher_logprobs.dtype) == torch.float64 else tl.float32,
    )
    return sorted_columns, constexprs


def _teacher_weight(divergence: str, coefficient: float) -> float:
    """w of the mixture m = w p + (1 - w) q: the skew reverse KL's m = alpha q + (1 - alpha) p has w = 1 - alpha."""
    return 1.0 - coefficient if divergence == "skew_reverse_kl" else float(coefficient)


def forward(
    student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, target: torch.Tensor | None,
    mask: torch.Tensor | None, divergence: str, tail: str, coefficient: float, inv_temperature: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on a ``[n_outer, rows_per_outer, V]`` student row view and ``[N, K]`` contiguous
    teacher tensors: ``(value, student_logprob, entropy, mean_partial [N], row_stats [N, 4])`` in the accumulation
    dtype (the CPU kernel's outputs)."""
    sorted_columns, constexprs = _launch_arguments(student, teacher_ids, teacher_logprobs, target, divergence, tail,
                                                   coefficient, vocab_size)
    n_rows = student.shape[0] * student.shape[1]
    dtype = compute_dtype(student.dtype, teacher_logprobs.dtype)
    value, student_logprob, entropy, mean_partial = (student.new_empty(n_rows, dtype=dtype) for _ in range(4))
    row_stats = student.new_empty(n_rows, 4, dtype=dtype)
    block_v = _block_size(vocab_size)
    _sparse_forward_kernel[(n_rows,)](
        student, teacher_ids, teacher_logprobs, sorted_columns, target if target is not None else value,
        mask if mask is not None else value, value, student_logprob, entropy, mean_partial, row_stats,
        *_row_strides(student), vocab_size, teacher_ids.shape[1], float(coefficient),
        _teacher_weight(divergence, coefficient), inv_temperature,
        HAS_MASK=mask is not None, BLOCK_V=block_v, num_warps=_num_warps(block_v), **constexprs,
    )
    return value, student_logprob, entropy, mean_partial, row_stats


def backward(
    student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, target: torch.Tensor | None,
    mask: torch.Tensor | None, grad_value: torch.Tensor, grad_student_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None, entropy: torch.Tensor, mean_partial: torch.Tensor, row_stats: torch.Tensor,
    divergence: str, tail: str, coefficient: float, inv_temperature: float, vocab_size: int,
) -> torch.Tensor:
    """Launch the backward kernel: the gradient of ``sum_i g_i D_i + b_i log q_i(y_i) + c_i H_i`` with respect to the
    student, ``[N, V_s]`` contiguous in its dtype (0 past ``vocab_size`` and in masked rows)."""
    sorted_columns, constexprs = _launch_arguments(student, teacher_ids, teacher_logprobs, target, divergence, tail,
                                                   coefficient, vocab_size)
    n_rows, student_width = student.shape[0] * student.shape[1], student.shape[2]
    grad_student = torch.empty((n_rows, student_width), dtype=student.dtype, device=student.device)
    zeros = torch.zeros_like(grad_value)
    block_v = _block_size(vocab_size)
    _sparse_backward_kernel[(n_rows,)](
        student, teacher_ids, teacher_logprobs, sorted_columns, target if target is not None else grad_value,
        mask if mask is not None else grad_value, grad_value,
        grad_student_logprob if grad_student_logprob is not None else zeros,
        grad_entropy if grad_entropy is not None else zeros, entropy, mean_partial, row_stats, grad_student,
        *_row_strides(student), student_width, vocab_size, teacher_ids.shape[1], float(coefficient),
        _teacher_weight(divergence, coefficient), inv_temperature,
        HAS_MASK=mask is not None, BLOCK_V=block_v, num_warps=_num_warps(block_v), **constexprs,
    )
    return grad_student
