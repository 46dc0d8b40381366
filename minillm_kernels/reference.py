"""The naive PyTorch formulas every kernel implements: the oracle the tests compare the backends against.

Everything here is written the way a user would write it by hand, on full ``[N, V]`` tensors, with autograd
providing the gradients. It runs in any float dtypes (float64 included, student and teacher may differ) on any
device. Shapes: ``student``/``teacher`` are ``[N, V_s]``/``[N, V_t]``, ``target``/``mask`` are ``[N]``; the first
``vocab_size`` columns are the real vocabulary. The gradients are also given in closed form (``token_stats_gradient``,
``divergence_gradient``, ``sparse_divergence_gradient``; ``divergence_partials`` and ``sparse_divergence_partials``
give sum_v q_v a_v): with them, these formulas are the "reference" backend's kernels (``ops/reference_kernels.py``),
which run inside the custom ops as the other backends' do, where autograd cannot record.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from minillm_kernels.backends import compute_dtype


def _scaled(logits: torch.Tensor, vocab_size: int, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """(logits[:, :vocab_size] - c) k in ``dtype``, k = 1/T: logits / T up to a shift per row, which no softmax sees.
    As in the kernels, c is the row's largest logit (0 where all are -inf; detached) and k is computed in float64,
    so that a tiny T (k up to the dtype's largest number) overflows no difference that float64 holds."""
    x = logits[:, :vocab_size].to(dtype)
    centre = x.detach().amax(-1, keepdim=True)
    return (x - torch.where(centre == -math.inf, 0.0, centre)) * (1.0 / temperature)


def _log_softmax(logits: torch.Tensor, vocab_size: int, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """log softmax(logits[:, :vocab_size] / T), computed in ``dtype``."""
    return torch.log_softmax(_scaled(logits, vocab_size, temperature, dtype), dim=-1)


def _unmasked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the rows ``mask`` leaves out replaced by zeros: a masked row is not read, as in the kernels (its
    outputs are 0 and its gradient exactly 0, also where it holds NaN or infinities)."""
    return logits if mask is None else torch.where(mask.unsqueeze(-1), logits, 0.0)


def token_stats(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (KL(q || p), log q(y), log p(y), H(q)), each ``[N]``, 0 where ``mask`` is False.

    log q = log_softmax(s / T), log p = log_softmax(t / T) over the first ``vocab_size`` columns, both in
    ``compute_dtype(student.dtype, teacher.dtype)`` (the dtype of the results); KL = sum_v q_v (log q_v -
    log p_v), H = -sum_v q_v log q_v, terms with q_v = 0 count 0. Without ``target`` the two log-probabilities
    are zeros. A target outside [0, vocab_size) in an unmasked row has no column: NaN log-probabilities for
    that row, and under autograd the gradient of log q(y) = s'_y - lse(s') without its one-hot, i.e. through the
    -lse(s') part alone (-q), which every id has; masked rows are not read and may hold any id (e.g. -100). The
    teacher gets no gradient.
    """
    dtype = compute_dtype(student.dtype, teacher.dtype)
    student, teacher = _unmasked(student, mask), _unmasked(teacher.detach(), mask)
    student_logq = _log_softmax(student, vocab_size, temperature, dtype)
    teacher_logp = _log_softmax(teacher.detach(), vocab_size, temperature, dtype)
    q = student_logq.exp()
    zero = student_logq.new_zeros(())
    # Select before multiplying, so that the dead terms' gradients are 0 and not 0 * inf = NaN.
    live = q > 0
    kl = (q * torch.where(live, student_logq - teacher_logp, zero)).sum(-1)
    entropy = -(q * torch.where(live, student_logq, zero)).sum(-1)
    if target is None:
        student_logprob = teacher_logprob = torch.zeros_like(kl)
    else:
        in_range = (target >= 0) & (target < vocab_size)
        index = torch.where(in_range, target, 0).unsqueeze(-1)  # a column of the row whatever the id
        nan = student_logq.new_full((), float("nan"))
        # Out of range: s'_y is NaN, the -lse(s') part remains (and with it the gradient -q).
        no_column = nan - torch.logsumexp(_scaled(student, vocab_size, temperature, dtype), -1)
        student_logprob = torch.where(in_range, student_logq.gather(-1, index).squeeze(-1), no_column)
        teacher_logprob = torch.where(in_range, teacher_logp.gather(-1, index).squeeze(-1), nan)
    stats = (kl, student_logprob, teacher_logprob, entropy)
    if mask is not None:
        stats = tuple(torch.where(mask, x, zero) for x in stats)
    return stats


def row_stats(student: torch.Tensor, teacher: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """The kernels' row statistics, ``[N, 4]`` in ``compute_dtype``: ``(c_s, log Z_s, c_t, log Z_t)``, with c a row's
    largest logit over the first ``vocab_size`` columns (0 where all of them are -inf) and
    log Z = logsumexp((x - c) / T), so that log q_v = (s_v - c_s) / T - log Z_s and lse(s / T) = c_s / T + log Z_s
    (likewise for the teacher). No gradient."""
    dtype = compute_dtype(student.dtype, teacher.dtype)

    def centred(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.detach()[:, :vocab_size].to(dtype)
        centre = x.max(-1, keepdim=True).values
        centre = torch.where(centre == -math.inf, 0.0, centre)
        return centre.squeeze(-1), torch.logsumexp((x - centre) / temperature, -1)

    return torch.stack((*centred(student), *centred(teacher)), -1)


def token_stats_gradient(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    upstream: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    temperature: float,
    vocab_size: int,
) -> torch.Tensor:
    """d/d(student) of sum_i a_i KL_i + b_i log q_i(y_i) + c_i H_i, ``upstream = (a, b, c)`` each ``[N]``, in closed
    form (for where autograd cannot record, e.g. inside a custom op), as the kernels' backward computes it: from
    ``saved = (KL, H, row_stats)`` (``row_stats`` as ``row_stats`` gives them), in the student's dtype,

        log q_v = (s_v - c_s) / T - log Z_s,     log p_v = (t_v - c_t) / T - log Z_t,
        (1/T) (a q_v (log q_v - log p_v - KL) + b ([v = y] - q_v) - c q_v (log q_v + H)),   0 where q_v = 0,

    over the first ``vocab_size`` columns (0 past them and in rows ``mask`` leaves out), without the one-hot [v = y]
    for an out-of-range target (as ``token_stats`` under autograd gives) and without b when there is no target.
    """
    dtype = compute_dtype(student.dtype, teacher.dtype)
    grad_kl, grad_student_logprob, grad_entropy, kl, entropy = (x.to(dtype).unsqueeze(-1) for x in (*upstream, *saved[:2]))
    centre_s, log_z_s, centre_t, log_z_t = saved[2].to(dtype).unsqueeze(-1).unbind(-2)
    student_logq = (student[:, :vocab_size].to(dtype) - centre_s) / temperature - log_z_s
    teacher_logp = (teacher.detach()[:, :vocab_size].to(dtype) - centre_t) / temperature - log_z_t
    q = student_logq.exp()
    terms = grad_kl * (student_logq - teacher_logp - kl) - grad_entropy * (student_logq + entropy)
    if target is not None:
        in_range = ((target >= 0) & (target < vocab_size)).unsqueeze(-1)
        one_hot = torch.nn.functional.one_hot(torch.where(in_range.squeeze(-1), target, 0), vocab_size)
        terms = terms - grad_student_logprob
    grad = torch.where(q > 0, q * terms, 0.0)
    if target is not None:
        grad = grad + grad_student_logprob * torch.where(in_range, one_hot, 0)
    if mask is not None:
        grad = torch.where(mask.unsqueeze(-1), grad, 0.0)
    grad = torch.nn.functional.pad(grad / temperature, (0, student.shape[-1] - vocab_size))
    return grad.to(student.dtype)


DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def _weighted_log_ratio(prob: torch.Tensor, log_prob: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    """prob (log_prob - log_other) elementwise, 0 where prob = 0 (with a zero gradient there, not 0 * inf = NaN)."""
    live = prob > 0
    return torch.where(live, prob * torch.where(live, log_prob - log_other, 0.0), 0.0)


def _log_mixture(weight: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(weight a + (1 - weight) b) from log a and log b, as logaddexp(log weight + log a, log(1 - weight) + log b);
    -inf (with a zero gradient) where a = b = 0."""
    both_dead = (log_a == -math.inf) & (log_b == -math.inf)
    log_a, log_b = (torch.where(both_dead, 0.0, x) for x in (log_a, log_b))  # (no NaN in logaddexp's backward)
    log_weight = math.log(weight) if weight > 0 else -math.inf
    log_other_weight = math.log1p(-weight) if weight < 1 else -math.inf  # (weight in [0, 1]; or no error here)
    log_mix = torch.logaddexp(log_a + log_weight, log_b + log_other_weight)
    return torch.where(both_dead, -math.inf, log_mix)


def divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    vocab_size: int,
    divergence: str,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence D(p, q), ``[N]`` in ``compute_dtype(student.dtype, teacher.dtype)``, 0 where ``mask`` is
    False; q = softmax(s / T), p = softmax(t / T) over the first ``vocab_size`` columns; the teacher gets no gradient:

        "reverse_kl"       KL(q || p) = sum_v q_v (log q_v - log p_v)
        "forward_kl"       KL(p || q) = sum_v p_v (log p_v - log q_v)
        "jsd"              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,  0 < beta < 1
        "skew_forward_kl"  KL(p || m),  m = skew p + (1 - skew) q,  0 <= skew < 1
        "skew_reverse_kl"  KL(q || m),  m = skew q + (1 - skew) p
        "tvd"              1/2 sum_v |p_v - q_v|

    A term whose leading probability (the first argument of its KL) is 0 counts 0, with a zero gradient; log m is
    taken as a logaddexp of the two log-probabilities. The gradient of |p_v - q_v| at p_v = q_v is 0. As in the
    kernels, a row whose softmax is undefined in either model (a NaN or +inf logit, or every logit -inf) gives NaN,
    and masked rows are not read.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    dtype = compute_dtype(student.dtype, teacher.dtype)
    student, teacher = _unmasked(student, mask), _unmasked(teacher.detach(), mask)
    log_q = _log_softmax(student, vocab_size, temperature, dtype)
    log_p = _log_softmax(teacher, vocab_size, temperature, dtype)
    terms = divergence_terms(log_q, log_p, divergence, beta, skew)
    # An undefined softmax has a NaN log-probability somewhere (a -inf log-probability is not NaN). The terms alone,
    # which skip zero probabilities, would drop it: NaN in the value and, through sum_v q_v (= 1), in the gradient.
    undefined = log_q.isnan().any(-1) | log_p.isnan().any(-1)
    value = terms.sum(-1) + torch.where(undefined, math.nan, 0.0) * log_q.exp().sum(-1)
    return value if mask is None else torch.where(mask, value, 0.0)


def divergence_terms(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float = 0.5,
                     skew: float = 0.1) -> torch.Tensor:
    """The terms of ``divergence``'s sum over outcomes, elementwise, from the two log-probabilities (the table of
    ``divergence``; a term whose leading probability is 0 counts 0, with a zero gradient)."""
    q, p = log_q.exp(), log_p.exp()
    if divergence == "reverse_kl":
        terms = _weighted_log_ratio(q, log_q, log_p)
    elif divergence == "forward_kl":
        terms = _weighted_log_ratio(p, log_p, log_q)
    elif divergence == "jsd":
        log_m = _log_mixture(beta, log_p, log_q)
        terms = beta * _weighted_log_ratio(p, log_p, log_m) + (1 - beta) * _weighted_log_ratio(q, log_q, log_m)
    elif divergence == "skew_forward_kl":
        terms = _weighted_log_ratio(p, log_p, _log_mixture(skew, log_p, log_q))
    elif divergence == "skew_reverse_kl":
        terms = _weighted_log_ratio(q, log_q, _log_mixture(skew, log_q, log_p))
    else:
        terms = 0.5 * (p - q).abs()
    return terms


def outcome_partials(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float,
                      skew: float) -> torch.Tensor:
    """q_v a_v, a_v = dD/dq_v, elementwise from the two log-probabilities of each outcome (the teacher's held fixed):
    reverse_kl q (log q - log p + 1); forward_kl -p; jsd (1 - beta) q log(q / m); skew_forward_kl -p (1 - skew p / m);
    skew_reverse_kl q (log(q / m) + 1 - skew q / m); tvd 1/2 q sign(q - p); 0 where the leading probability is 0."""
    q, p = log_q.exp(), log_p.exp()

    def ratio(prob, log_prob, log_other):  # log_prob - log_other where prob > 0, else 0
        return torch.where(prob > 0, log_prob - log_other, 0.0)

    if divergence == "reverse_kl":
        return torch.where(q > 0, q * (ratio(q, log_q, log_p) + 1), 0.0)
    if divergence == "forward_kl":
        return -p
    if divergence == "jsd":
        return (1 - beta) * _weighted_log_ratio(q, log_q, _log_mixture(beta, log_p, log_q))
    if divergence == "skew_forward_kl":
        log_p_over_m = ratio(p, log_p, _log_mixture(skew, log_p, log_q))
        return torch.where(p > 0, -p * (1 - skew * log_p_over_m.exp()), 0.0)
    if divergence == "skew_reverse_kl":
        log_q_over_m = ratio(q, log_q, _log_mixture(skew, log_q, log_p))
        return torch.where(q > 0, q * (log_q_over_m + 1 - skew * log_q_over_m.exp()), 0.0)
    return 0.5 * q * torch.sign(q - p)


def divergence_partials(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    vocab_size: int,
    divergence: str,
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, q a)``, each ``[N, vocab_size]`` in ``compute_dtype`` and detached: the student's probabilities and
    q_v a_v = q_v dD/dq_v (``outcome_partials``) of ``divergence`` as ``divergence`` computes it, 0 in rows ``mask``
    leaves out. sum_v q_v a_v is the kernels' ``mean_partial``; the gradient is ``divergence_gradient``'s."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    dtype = compute_dtype(student.dtype, teacher.dtype)
    student, teacher = _unmasked(student.detach(), mask), _unmasked(teacher.detach(), mask)
    log_q = _log_softmax(student, vocab_size, temperature, dtype)
    log_p = _log_softmax(teacher, vocab_size, temperature, dtype)
    q, qa = log_q.exp(), outcome_partials(log_q, log_p, divergence, beta, skew)
    # A row whose softmax is undefined in either model (NaN, +inf, every logit -inf): NaN, which the partials'
    # "probability 0 counts 0" would otherwise drop (as the value and the kernels' gradient are).
    undefined = log_q.isnan().any(-1, keepdim=True) | log_p.isnan().any(-1, keepdim=True)
    qa = qa * torch.where(undefined, math.nan, 1.0)
    if mask is not None:
        q, qa = (torch.where(mask.unsqueeze(-1), x, 0.0) for x in (q, qa))
    return q, qa


def divergence_gradient(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    upstream: torch.Tensor,
    temperature: float,
    vocab_size: int,
    divergence: str,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """d/d(student) of sum_i g_i D_i (``upstream = g``, ``[N]``) for ``divergence`` as ``divergence`` computes it, in
    closed form (for where autograd cannot record, e.g. inside a custom op), in the student's dtype:

        (1/T) (q_v a_v - q_v sum_u q_u a_u),   a_v = dD/dq_v,

    with q_v a_v: reverse_kl q (log q - log p + 1); forward_kl -p; jsd (1 - beta) q log(q / m); skew_forward_kl
    -p (1 - skew p / m); skew_reverse_kl q (log(q / m) + 1 - skew q / m); tvd 1/2 q sign(q - p); 0 where the leading
    probability is 0 (``divergence_partials``); NaN in the rows whose value is NaN. 0 past ``vocab_size`` and in rows
    ``mask`` leaves out.
    """
    q, qa = divergence_partials(student, teacher, mask, temperature, vocab_size, divergence, beta, skew)
    grad = upstream.to(q.dtype).unsqueeze(-1) / temperature * (qa - q * qa.sum(-1, keepdim=True))
    if mask is not None:  # (a masked row's upstream may be anything)
        grad = torch.where(mask.unsqueeze(-1), grad, 0.0)
    return torch.nn.functional.pad(grad, (0, student.shape[-1] - vocab_size)).to(student.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The sparse teacher (docs/design.md, "The sparse teacher"): K (id, log p) pairs per row, the tail completed.
# ---------------------------------------------------------------------------------------------------------------
SPARSE_TAILS = ("bin", "uniform", "renormalized")


class SparseEntries(NamedTuple):
    """A sparse teacher's entries as the formulas use them, per row of ``[N, K]`` pairs: ``live`` where the entry
    counts (log p > -inf; NaN counts, and makes its row NaN), ``column`` its id where live and in range (else 0, a
    column of the row whatever the id), ``log_p`` its log-probability (-inf where not live), ``in_entries`` the
    ``[N, V]`` columns of I, ``n_live`` K' and ``no_column`` the rows with a live id outside [0, V)."""

    live: torch.Tensor
    column: torch.Tensor
    log_p: torch.Tensor
    in_entries: torch.Tensor
    n_live: torch.Tensor
    no_column: torch.Tensor


def sparse_entries(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, vocab_size: int,
                   dtype: torch.dtype) -> SparseEntries:
    """``SparseEntries`` of ``[N, K]`` ids and log-probabilities (the log-probabilities in ``dtype``, detached)."""
    log_p = teacher_logprobs.detach().to(dtype)
    live = log_p != -math.inf
    in_range = (teacher_ids >= 0) & (teacher_ids < vocab_size)
    column = torch.where(live & in_range, teacher_ids, 0).long()
    counted = (live & in_range).to(dtype)
    rows = log_p.shape[0]
    in_entries = log_p.new_zeros(rows, vocab_size).scatter_add_(1, column, counted) > 0
    return SparseEntries(live, column, torch.where(live, log_p, -math.inf), in_entries, counted.sum(-1).long(),
                         (live & ~in_range).any(-1))


def sparse_tail_mass(log_p: torch.Tensor, n_live: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log P_R per row, float64, of ``[N, K]`` entry log-probabilities ``log_p`` (-inf: no entry) and the ``[N]``
    counts K' of live ones: P_R = max(1 - sum_I p_k, 0) (a sum above 1 is rounding), and 0 where R is empty (K' = V);
    NaN where a log-probability is NaN."""
    p_entries = log_p.double().exp().sum(-1)
    tail = torch.where(n_live < vocab_size, (1 - p_entries).clamp(min=0), 0.0)
    return torch.where(p_entries.isnan(), math.nan, tail).log()


def sparse_teacher_completion(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail: str,
    temperature: float,
    vocab_size: int,
) -> torch.Tensor:
    """The teacher completed over the vocabulary, log p~ ``[N, V]`` in ``compute_dtype(student, logprobs)``: the given
    log p_k at the ids of I and, on the other columns R,

        "bin"      log p~_v = log P_R + (x_v - lse_R(x)),  x = s / T   (the student's shape, scaled to the tail
                   mass P_R; evenly where the student has no mass on R: every completion gives the same divergence)
        "uniform"  log p~_v = log P_R - log(V - K')

    ("bin" depends on the student and is differentiable in it; its divergence's gradient is the same with the
    completion detached, see docs/design.md). The shares x_v - lse_R(x) are a log-softmax over R: no 1 - Q_I."""
    if tail not in ("bin", "uniform"):
        raise ValueError(f"only the 'bin' and 'uniform' tails complete the teacher, got {tail!r}")
    dtype = compute_dtype(student.dtype, teacher_logprobs.dtype)
    entries = sparse_entries(teacher_ids, teacher_logprobs, vocab_size, dtype)
    log_tail = sparse_tail_mass(entries.log_p, entries.n_live, vocab_size).to(dtype)[:, None]
    if tail == "bin":
        scaled = _scaled(student, vocab_size, temperature, dtype)
        tail_logits = torch.where(entries.in_entries, -math.inf, scaled)
        # Where the student has no mass on R (Q_R = 0), every completion gives the same value: P_R spread evenly.
        # (The logsumexp of zeros there: an all -inf logsumexp has a NaN gradient even where it is not used.)
        no_tail = (tail_logits == -math.inf).all(-1, keepdim=True)
        lse_tail = torch.logsumexp(torch.where(no_tail, 0.0, tail_logits), -1, keepdim=True)
        n_tail = (vocab_size - entries.n_live).clamp(min=1).to(dtype)[:, None]
        shares = torch.where(no_tail, -n_tail.log(), tail_logits - lse_tail)
        log_completion = log_tail + torch.where(entries.in_entries, -math.inf, shares)
    else:
        n_tail = (vocab_size - entries.n_live).clamp(min=1).to(dtype)[:, None]
        log_completion = (log_tail - n_tail.log()).expand(-1, vocab_size)
    entry_log_p = torch.full_like(log_completion, -math.inf).scatter_reduce(
        1, entries.column, torch.where(entries.live, entries.log_p, -math.inf), "amax")
    return torch.where(entries.in_entries, entry_log_p, log_completion)


def sparse_divergence(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    vocab_size: int,
    divergence: str,
    tail: str = "bin",
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence D(p, q) of the student q = softmax(s / T) (first ``vocab_size`` columns of ``[N, V_s]``)
    from a teacher given as ``[N, K]`` ids and log-probabilities (normalised over its full vocabulary, -inf = no
    entry), ``[N]`` in ``compute_dtype(student.dtype, teacher_logprobs.dtype)``, 0 where ``mask`` is False:

        "bin", "uniform"  ``divergence`` over the V columns against ``sparse_teacher_completion``
                          (bin: equal to D over the K' + 1 outcomes (p_I, P_R) vs (q_I, Q_R))
        "renormalized"    ``divergence`` over the K' entries, both models renormalised on them:
                          log p^_k = log p_k - lse(log p_I), log q^_i = x_i - lse(x_I) (0 where K' = 0)

    the terms of ``divergence_terms``. The float64 oracle of the sparse kernels, with their contract: masked rows are
    not computed (0, gradient exactly 0); NaN in a row's log-probabilities, in its student logits (those the mode
    reads: all V for "bin" and "uniform", the K' entries for "renormalized") or a live id outside [0, V) gives NaN.
    Autograd gives the gradient (in closed form: ``sparse_divergence_gradient``).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    log_q, log_p, undefined = _sparse_outcomes(student, teacher_ids, teacher_logprobs, mask, temperature, vocab_size,
                                               tail)
    value = divergence_terms(log_q, log_p, divergence, beta, skew).sum(-1)
    # NaN (which the terms' "probability 0 counts 0" would drop) and a live id out of range: NaN, in the value and
    # (through the product) in the row's gradient, as in the kernels.
    value = value * torch.where(undefined, math.nan, 1.0)
    return value if mask is None else torch.where(mask, value, 0.0)


def _sparse_outcomes(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                     mask: torch.Tensor | None, temperature: float, vocab_size: int,
                     tail: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log q, log p, undefined)`` of ``sparse_divergence``'s outcomes: ``[N, V]`` for "bin" and "uniform" (the
    student's log-softmax, the completed teacher), ``[N, K]`` for "renormalized" (both renormalised on the entries,
    -inf at dead ones); ``undefined`` ``[N]`` the rows whose value is NaN. Masked rows are a row of zeros without
    entries (finite, so that their zero gradient stays 0)."""
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {tail!r}")
    dtype = compute_dtype(student.dtype, teacher_logprobs.dtype)
    if mask is not None:
        student = torch.where(mask[:, None], student, 0.0)
        teacher_ids = torch.where(mask[:, None], teacher_ids, 0)
        teacher_logprobs = torch.where(mask[:, None], teacher_logprobs, -math.inf)
    entries = sparse_entries(teacher_ids, teacher_logprobs, vocab_size, dtype)
    if tail == "renormalized":
        # Only the entries' columns are read (centred on their largest): NaN elsewhere in the row does not reach them.
        gathered = student[:, :vocab_size].gather(1, entries.column)
        logits = _scaled(torch.where(entries.live, gathered, -math.inf), gathered.shape[1], temperature, dtype)
        has_entries = (entries.n_live > 0)[:, None]
        log_q = logits - torch.logsumexp(torch.where(has_entries, logits, 0.0), -1, keepdim=True)
        log_p = entries.log_p - torch.logsumexp(torch.where(has_entries, entries.log_p, 0.0), -1, keepdim=True)
    else:
        log_q = _log_softmax(student, vocab_size, temperature, dtype)
        log_p = sparse_teacher_completion(student, teacher_ids, teacher_logprobs, tail, temperature, vocab_size)
    undefined = entries.no_column | log_p.isnan().any(-1) | log_q.isnan().any(-1)
    return log_q, log_p, undefined


def sparse_divergence_partials(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    vocab_size: int,
    divergence: str,
    tail: str = "bin",
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, q a)``, each ``[N, vocab_size]`` in ``compute_dtype`` and detached, of ``sparse_divergence``'s outcomes
    on their columns: "bin" and "uniform" the student's probabilities and q_v a_v (``outcome_partials``) of the
    divergence over the V columns against the completion held fixed (the bin completion's dependence on the
    student adds nothing to the gradient: docs/design.md); "renormalized" those of the renormalised entries on their
    columns, 0 on R. 0 in rows ``mask`` leaves out; NaN rows as they come (``sparse_divergence_gradient`` makes the
    whole row NaN). sum_v q_v a_v is the kernels' ``mean_partial``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    log_q, log_p, _ = _sparse_outcomes(student.detach(), teacher_ids, teacher_logprobs, mask, temperature,
                                       vocab_size, tail)
    q, qa = log_q.exp(), outcome_partials(log_q, log_p, divergence, beta, skew)
    if tail == "renormalized":  # the entries' outcomes onto their columns (dead entries add 0 to column 0)
        dtype = compute_dtype(student.dtype, teacher_logprobs.dtype)
        column = sparse_entries(teacher_ids, teacher_logprobs, vocab_size, dtype).column
        q, qa = (log_q.new_zeros(log_q.shape[0], vocab_size).scatter_add_(1, column, x) for x in (q, qa))
    if mask is not None:
        q, qa = (torch.where(mask[:, None], x, 0.0) for x in (q, qa))
    return q, qa


def sparse_divergence_gradient(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    upstream: torch.Tensor,
    temperature: float,
    vocab_size: int,
    divergence: str,
    tail: str = "bin",
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """d/d(student) of sum_i g_i D_i (``upstream = g``, ``[N]``) for ``sparse_divergence``, in closed form (for where
    autograd cannot record, e.g. inside a custom op), in the student's dtype:

        (1/T) g (q_v a_v - q_v sum_u q_u a_u)

    with q and q a of ``sparse_divergence_partials`` ("renormalized": q the student renormalised on the entries, so
    0 on R); NaN in the rows whose value is NaN; 0 past ``vocab_size`` and in rows ``mask`` leaves out."""
    q, qa = sparse_divergence_partials(student, teacher_ids, teacher_logprobs, mask, temperature, vocab_size,
                                       divergence, tail, beta, skew)
    _, _, undefined = _sparse_outcomes(student.detach(), teacher_ids, teacher_logprobs, mask, temperature, vocab_size,
                                       tail)
    grad = upstream.to(q.dtype).unsqueeze(-1) / temperature * (qa - q * qa.sum(-1, keepdim=True))
    grad = grad * torch.where(undefined, math.nan, 1.0).unsqueeze(-1)
    if mask is not None:
        grad = torch.where(mask[:, None], grad, 0.0)
    return torch.nn.functional.pad(grad, (0, student.shape[-1] - vocab_size)).to(student.dtype)


def sparse_token_stats(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    vocab_size: int,
    tail: str = "bin",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(reverse KL under the tail mode, log q(y), H(q))`` per row, ``[N]``, 0 where ``mask`` is False: the first of
    ``sparse_divergence``, the other two of ``token_stats`` (whose teacher is unused here: the student is passed)."""
    kl = sparse_divergence(student, teacher_ids, teacher_logprobs, mask, temperature, vocab_size, "reverse_kl", tail)
    dtype = compute_dtype(student.dtype, teacher_logprobs.dtype)
    _, student_logprob, _, entropy = token_stats(student.to(dtype), student.detach().to(dtype), target, mask,
                                                 temperature, vocab_size)
    return kl, student_logprob, entropy
