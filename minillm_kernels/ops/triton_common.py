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
def _expm1(x, e):
    """exp(x) - 1 for x >= -log 2, given e = exp(x) (the caller's, so that it is not computed twice), to a few ulps:
    Kahan's (e - 1) x / log e, which corrects the rounding of e near x = 0 (x itself where e rounds to 1). Only there
    (``_log_mixture`` takes another form below): where e is subnormal (x below -87.3 in float32, -708.4 in float64)
    it is rounded with a relative error of up to 1/2, which log e carries into the result (7e-3 at x = -103 in
    float32)."""
    return tl.where(e == 1.0, x, (e - 1.0) * x / tl.log(e))


@triton.jit
def _log1p(x):
    """log(1 + x) for x > -1, to a few ulps also near 0 (Kahan: log(u) x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _split(x, dtype: tl.constexpr):
    """A float64 scalar x as a pair hi + lo of ``dtype`` scalars (hi = x rounded, lo = the rest rounded): a product
    y hi + y lo is y x to one rounding of the result, where y hi alone would carry hi's rounding into every column of
    a row alike (2e-8 relative for w = 0.9 in float32, which a sum of terms of both signs turns into 1e-7 of the
    result). lo is 0 in float64."""
    hi = x.to(dtype)
    return hi, (x - hi.to(tl.float64)).to(dtype)


@triton.jit
def _log_mixture(d, d_lo, weight):
    """``(L, correction)`` with L + correction = log((1 - w) + w exp(d + d_lo)), elementwise over a block d + d_lo
    (``ACC_DTYPE``; d_lo a few ulps of d, 0 where d is +-inf or NaN) for a float64 scalar weight w in (0, 1): log(m / q)
    of the mixture m = w p + (1 - w) q at log p - log q = d + d_lo. Three forms of L(d), each where its rounding errs
    least:
        d < -log 2:        log(1 - w) + log1p(w / (1 - w) exp(d))   (log(1 - w) exactly where p = 0)
        -log 2 <= d <= 64: log1p(w expm1(d))                         (relative to the result: small near d = 0)
        d > 64:            d + log w + log1p((1 - w) / w exp(-d))   (no overflow of expm1; +inf where q = 0)
    and the correction L'(d) d_lo, L' = w e^d / ((1 - w) + w e^d) (first order: d_lo L'' d_lo is below an ulp), a
    separate term: added to L in float32 it would round away (it is a few ulps of d, not of L), and a caller that
    needs the logarithm to better than an ulp of itself (a term of a sum that cancels) adds the two in float64.
    - d_lo: a row's log p_v - log q_v is a column's centred difference minus one row constant, and the rounding of
      that subtraction is alike for the columns of a binade (the differences lie on float32's grid, the constant does
      not): 1e-7 of a skew KL near 0.03, kept by ``_difference``.
    - The row's constants w, log(1 - w) and the odds w / (1 - w) are float64, each taken as a pair hi + lo
      (``_split``), and 1 - w is never formed in ``ACC_DTYPE``: in float32 1 - 0.9f errs by 2.4e-7 relative, and the
      first form's log with it in every column where p << q (2.7e-7 of a skew KL at randn * 4 logits, T = 0.25).
    - log(m / q) comes straight from d, not from a tail of |d| shared with log(m / p) (log m - log q = max(d, 0) +
      log1p(w' expm1(-|d|))): that sum cancels near d = 0 by a factor 1 / w (10x on a skew KL's alpha = 0.1 side).
    - The middle form's exp(d) >= 1/2 keeps ``_expm1`` off subnormal exps (7e-3 at d = -103 in float32)."""
    w_hi, w_lo = _split(weight, d.dtype)
    odds_hi, odds_lo = _split(weight / (1.0 - weight), d.dtype)
    log_rest_hi, log_rest_lo = _split(tl.log(1.0 - weight), d.dtype)
    capped = tl.minimum(d, 64.0)
    e = tl.exp(capped)
    em1 = _expm1(capped, e)
    low, high = d < -0.6931471805599453, d > 64.0
    # Each form is an offset plus log1p of its own argument: one log1p per lane, of the argument its form takes.
    log1p_arg = tl.where(low, e * odds_hi + e * odds_lo, tl.where(high, tl.exp(-d) / odds_hi, em1 * w_hi + em1 * w_lo))
    tail = _log1p(log1p_arg)
    slope = e * w_hi / ((1.0 - weight).to(d.dtype) + e * w_hi)
    result = tl.where(low, log_rest_hi + (log_rest_lo + tail),
                      tl.where(high, d + tl.log(weight).to(d.dtype) + tail, tail))
    return result, d_lo * slope


@triton.jit
def _difference(x, c_hi, c_lo):
    """x - c as a pair hi + lo (``ACC_DTYPE`` blocks; c = c_hi + c_lo a row constant, ``_split``): hi = x - c_hi
    rounded, lo its rounding error (Knuth's TwoSum, exact) minus c_lo, so that hi + lo is x - c to ~u |c_lo|; lo is 0
    where hi is not finite."""
    hi = x - c_hi
    x_part = hi + c_hi
    lo = ((x - x_part) + (x_part - hi - c_hi)) - c_lo
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)  # (0 where hi is +-inf or NaN: no inf - inf)


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
