"""The Triton helpers every kernel family shares: the online log-normaliser (the one online softmax of the reverse
KL's, the divergences' and the sparse teacher's forward kernels), row addressing, bfloat16 rounding, log1p / expm1,
and the launch parameters.

log1p and expm1 are written out (``_log1p``, ``_expm1``: Kahan's corrections of log and exp, a few ulps), as Triton 3.6
has them only in libdevice, which the interpreter does not run. The names keep their leading underscore: they are
the kernels' internals, imported by ``reverse_kld_triton``, ``divergence_triton`` and ``sparse_triton`` only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm_kernels.reference import compute_dtype


@triton.jit
def _centre(running_max):
    """The centre of the sums: the running maximum, or 0 while it is -inf (so that -inf - centre is -inf)."""
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def _online_log_normaliser(running_max, normaliser, block, inv_temperature64, inv_temperature):
    """One block of the online log-normaliser log Z = log sum_v exp(k x_v) of a row (online softmax), for every
    forward kernel: the running maximum m of the raw logits x, its centre c (m, or 0 while m is -inf: ``_centre``) and
    Z = sum_v exp(k (x_v - c)) in float64, taken over one more block of x (``ACC_DTYPE``, -inf where not in the row):
        m' = max(m, max_v x_v),   d = min(c - c', 0),   r = exp(k d),   e_v = exp(k (x_v - c')),   Z' = r Z + sum_v e_v.
    d is float64, where the centres' difference is exact; the min keeps d = 0 where an empty sum's centre 0 lies
    above the first finite maximum (r <= 1 then never meets Z = 0 as inf * 0). A column at -inf gives e_v = 0;
    NaN stays NaN. Returns ``(m', c', Z', e, d, r)``: e the block's terms (``ACC_DTYPE``); a caller's other sums over
    the same columns re-centre with d and r (``_recentred_moment``)."""
    old_centre = _centre(running_max).to(tl.float64)
    running_max = tl.maximum(running_max, tl.max(block, axis=0))
    centre = _centre(running_max)
    shift = tl.minimum(old_centre - centre.to(tl.float64), 0.0)
    ratio = tl.exp(shift * inv_temperature64)
    terms = tl.exp((block - centre) * inv_temperature)
    normaliser = normaliser * ratio + tl.sum(terms.to(tl.float64), axis=0)
    return running_max, centre, normaliser, terms, shift, ratio


@triton.jit
def _recentred_moment(moment, normaliser, shift, ratio):
    """A float64 sum M = sum_v e_v (x_v - c) re-centred on the new centre c' = c - d (``_online_log_normaliser``'s d
    and r; Z the normaliser before the block): e_v -> r e_v and x_v - c -> (x_v - c') + d give M -> r (M + d Z);
    0 where Z or r is 0 (an empty sum, or d = -inf at a +inf logit, where the product would be NaN)."""
    return tl.where((normaliser > 0) & (ratio > 0), ratio * (moment + shift * normaliser), 0.0)


@triton.jit
def _row_offset(row, rows_per_outer, outer_stride, inner_stride):
    """The element offset of row ``row`` (int64) in ``[n_outer, rows_per_outer, V]`` logits of strides
    ``(outer_stride, inner_stride, 1)``: int64, as ``row`` is (it passes 2^31 once N * V does)."""
    return (row // rows_per_outer) * outer_stride + (row % rows_per_outer) * inner_stride


@triton.jit
def _round_to_bfloat16(x):
    """x rounded to bfloat16, to nearest even (NaN -> 0x7fc0), through float32 for float64 x. Written out because
    Triton's interpreter truncates float32 -> bfloat16 casts (and mangles float64 -> bfloat16 ones); compiled, the
    cast rounds to nearest even as this does."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0, to a few ulps, with e = exp(x): e - 1 where e < 1/2 (no cancellation there; -1 at -inf),
    else Kahan's (e - 1) x / log e, which corrects the rounding of e near x = 0 (x itself where e rounds to 1). Not
    Kahan's below 1/2: there e may be subnormal (x below -87.3 in float32, -708.4 in float64), rounded with a relative
    error of up to 1/2, which his log e carries into the result (7e-3 at x = -103 in float32)."""
    e = tl.exp(x)
    corrected = (e - 1.0) * x / tl.log(tl.maximum(e, 0.5))  # (the maximum: no log of 0 in lanes not taken)
    return tl.where(e < 0.5, e - 1.0, tl.where(e == 1.0, x, corrected))


@triton.jit
def _log1p(x):
    """log(1 + x) for -1 < x <= 0, to a few ulps also near 0 (Kahan: log(u) x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


def _block_size(vocab_size: int) -> int:
    return min(triton.next_power_of_2(max(vocab_size, 1)), 4096)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _acc_dtype(student: torch.Tensor, teacher: torch.Tensor) -> tl.dtype:
    """The per-element arithmetic: float64 if either input is float64, float32 otherwise."""
    return tl.float64 if compute_dtype(student.dtype, teacher.dtype) == torch.float64 else tl.float32


def _row_strides(logits: torch.Tensor) -> tuple[int, int, int]:
    """``(rows_per_outer, outer_stride, inner_stride)`` of ``[n_outer, rows_per_outer, V]`` logits."""
    return logits.shape[1], logits.stride(0), logits.stride(1)
