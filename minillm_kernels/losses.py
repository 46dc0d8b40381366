"""The losses from logits, the package's public entry points (``import minillm_kernels as mk``):

    fused_reverse_kld         KL(q || p) per token, reduced: the MiniLLM distillation loss
    fused_divergence          the divergence family: reverse and forward KL, JSD(beta), skew KLs, TVD
    fused_token_stats         every per-token MiniLLM term of sampled tokens (KL, log q(y), log p(y), w, entropy)
    fused_sparse_divergence   a divergence from a teacher given as its top-k log-probabilities, the tail completed
    fused_sparse_token_stats  the per-token MiniLLM terms of sampled tokens against such a sparse teacher
    topk_teacher              dense teacher logits -> (ids, log-probabilities): the sparse teacher

Each checks its arguments and picks a backend (``validation.py``), hands the ``[..., V]`` logits to the custom ops of
its kernel family as they are (``ops/reverse_kld.py``, ``ops/divergence.py``, ``ops/sparse.py``; any strides in the
leading dimensions, only a last dimension of stride other than 1 is copied), and reduces the per-token ``[N]``
results (``reduce_per_token``) or assembles them (``TokenStats``). With ``process_group`` (or DTensor logits) the
vocabulary is sharded over processes (``parallel.py``). The same from hidden states and lm_head weights, without the
logits, is ``linear.py``. docs/design.md has the math ("The sparse teacher": the tails, proofs and validation rules).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch.distributed.tensor import DTensor

from minillm_kernels import parallel
from minillm_kernels.backends import compute_dtype
from minillm_kernels.ops import divergence as divergence_ops
from minillm_kernels.ops import reverse_kld as ops
from minillm_kernels.ops import sparse as sparse_ops
from minillm_kernels.validation import (
    LogitsCall,
    as_int,
    as_real,
    check_companion,
    check_reduction,
    check_sampling_args,
    divergence_coefficient,
    validate_logits,
    validate_sparse_teacher,
)

__all__ = ["TokenStats", "fused_divergence", "fused_reverse_kld", "fused_sparse_divergence",
           "fused_sparse_token_stats", "fused_token_stats", "topk_teacher"]


# ---------------------------------------------------------------------------------------------------------------
# What the public functions return: per-token results reduced, or assembled into TokenStats
# ---------------------------------------------------------------------------------------------------------------
class TokenStats(NamedTuple):
    """Per-token MiniLLM terms, each of the logits' leading shape, 0 where the mask is False.

    reverse_kld:       KL_t = sum_v q_v (log q_v - log p_v)            (differentiable)
    student_logprob:   log q(y_t)                                      (differentiable)
    teacher_logprob:   log p(y_t)                                      (no gradient: teacher)
    log_ratio:         r_t = log p(y_t) - log q(y_t)                   (detached)
    importance_weight: w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t)), optionally clipped (detached)
    entropy:           H_t = -sum_v q_v log q_v, or None unless asked for  (differentiable)
    """

    reverse_kld: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    log_ratio: torch.Tensor
    importance_weight: torch.Tensor
    entropy: Optional[torch.Tensor]


def reduce_per_token(per_token: torch.Tensor, mask: Optional[torch.Tensor], lead_shape: torch.Size,
            reduction: str) -> torch.Tensor:
    """The ``[N]`` per-token loss (0 where masked) reduced: "none" reshaped to ``lead_shape``, "sum", or "mean" over
    the unmasked tokens (0, with zero gradient, when there are none)."""
    if reduction == "none":
        return per_token.reshape(lead_shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    count = per_token.new_tensor(per_token.numel()) if mask is None else mask.sum()
    return total / count.clamp(min=1)


def importance_weight(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, mix_alpha: float) -> torch.Tensor:
    """w = q(y) / (alpha p(y) + (1 - alpha) q(y)), from the log-probabilities.

    Computed as 1 / (alpha exp(log p - log q) + 1 - alpha): exactly 1 for alpha = 0 (whatever q(y), even 0),
    q/p for alpha = 1, and 0 where q(y) = 0 < alpha (there exp(log p - log q) = inf). NaN log-probabilities
    (an out-of-range target under torch.compile) give NaN.
    """
    if mix_alpha == 0:
        return torch.where(student_logprob.isnan() | teacher_logprob.isnan(), math.nan, 1.0).to(student_logprob.dtype)
    weight = 1.0 / (mix_alpha * (teacher_logprob - student_logprob).exp() + (1.0 - mix_alpha))
    return torch.where(student_logprob == -math.inf, 0.0, weight)  # q(y) = 0: 0, even where p(y) = 0 too


def assemble_token_stats(
    kl: torch.Tensor,
    student_logprob: torch.Tensor,
    teacher_logprob: torch.Tensor,
    entropy: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    lead_shape: torch.Size,
    mix_alpha: float,
    weight_clip: Optional[tuple[float, float]],
) -> TokenStats:
    """``TokenStats`` of ``lead_shape`` from the per-row ``[N]`` kernel outputs: adds the detached log-ratio
    and importance weight (clipped, 0 where masked); the teacher's log-probability is detached too."""
    teacher_logprob = teacher_logprob.detach()
    log_ratio = teacher_logprob - student_logprob.detach()
    weight = importance_weight(student_logprob.detach(), teacher_logprob, mix_alpha)
    if weight_clip is not None:
        weight = weight.clamp(weight_clip[0], weight_clip[1])
    if mask is not None:
        weight = torch.where(mask, weight, 0.0)
    fields = (kl, student_logprob, teacher_logprob, log_ratio, weight, entropy)
    return TokenStats(*(None if x is None else x.reshape(lead_shape) for x in fields))


def logits_shards(process_group, **logits: torch.Tensor):
    """``(shards or None, the logits as this rank's local tensors, in order)``: ``parallel.vocab_shards`` of a
    logits-level call whose ``logits`` (by argument name) are sharded on their last dimension (not entered without a
    process group or DTensor logits)."""
    if process_group is None and not any(isinstance(x, DTensor) for x in logits.values()):
        return None, tuple(logits.values())
    return parallel.vocab_shards(process_group, {name: (x, -1) for name, x in logits.items()})


# ---------------------------------------------------------------------------------------------------------------
# Dense logits
# ---------------------------------------------------------------------------------------------------------------
def fused_reverse_kld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """Reverse KL divergence KL(q || p) of the student q from the teacher p, per token, fused.

    With q = softmax(s / T) and p = softmax(t / T) over the first ``vocab_size`` columns:
        KL_t = sum_v q_v (log q_v - log p_v),
        dKL_t / ds_v = (1/T) q_v (log q_v - log p_v - KL_t)   (no T^2 factor is applied).

    Args:
        student_logits: ``[..., V_s]`` float logits of the student (gets the gradient). The leading dimensions may
            have any strides (e.g. ``logits[:, -(N+1):-1]`` of a ``[B, L, V]`` output): the kernels read them in
            place, with no copy, where they coalesce into two levels of rows, as every slice, transpose or
            ``expand`` of a ``[B, L, V]`` tensor does (three or more leading dimensions that do not merge are
            copied). The gradient is a fresh contiguous tensor of this shape.
        teacher_logits: ``[..., V_t]`` float logits of the teacher, same leading shape, any float dtype (frozen),
            strides as for the student (its own).
        mask: optional bool ``[...]``, True where the token counts.
        temperature: T > 0, applied to both models.
        reduction: "none" (``[...]``, 0 where masked), "sum", or "mean" over unmasked tokens
            (0, with zero gradient, when there are none).
        vocab_size: the real vocabulary size when the logits are padded to different widths; columns
            at or past it are ignored in both, without a copy.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see ``available_backends()``).
        process_group: a vocabulary sharded over this group's P ranks (tensor parallelism): the logits are this
            rank's columns [r W, (r + 1) W) of the vocabulary, W the same on every rank and for both models;
            ``vocab_size`` (default P W) and target ids are global, the mask replicated. Every rank returns the
            same loss, the unsharded one, and gets its slice of the unsharded gradient; the ranks exchange a few
            numbers per token, never the logits (``parallel.py``). DTensor logits placed ``Shard(-1)`` bring
            their mesh's group and need none (e.g. the output of ``ColwiseParallel(use_local_output=False)``).

    Returns:
        The loss, float32 (float64 if either logits tensor is float64). Logits holding NaN give NaN.
    """
    check_reduction(reduction)
    shards, (student_logits, teacher_logits) = logits_shards(
        process_group, student_logits=student_logits, teacher_logits=teacher_logits)
    rows = validate_logits(student_logits, teacher_logits, None, mask, temperature, vocab_size, backend, shards)
    kl = _token_stats(rows, shards)[0]
    return reduce_per_token(kl, rows.mask, rows.lead_shape, reduction)


def fused_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """A divergence D(p, q) of the student q from the teacher p, per token, fused.

    With q = softmax(s / T) and p = softmax(t / T) over the first ``vocab_size`` columns, ``divergence`` is one of
        "reverse_kl"       KL(q || p) = sum_v q_v (log q_v - log p_v)                    (``fused_reverse_kld``)
        "forward_kl"       KL(p || q) = sum_v p_v (log p_v - log q_v)
        "jsd"              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (TRL's convention)
        "skew_forward_kl"  KL(p || m),  m = skew p + (1 - skew) q                         (DistiLLM's SKL)
        "skew_reverse_kl"  KL(q || m),  m = skew q + (1 - skew) p                         (DistiLLM's SRKL)
        "tvd"              1/2 sum_v |p_v - q_v|
    terms whose leading probability is 0 counting 0. The gradient, with a_v = dD/dq_v (docs/design.md lists them):
        dD/ds_v = (1/T) q_v (a_v - sum_u q_u a_u)   (no T^2 factor; 0 at p_v = q_v for the TVD's |.|).
    Passes over each row: the reverse KL 1 forward (online), 1 backward; the others 2 forward (both log-normalisers,
    then the terms), 1 backward. A skew of 0 is the plain KL and runs its kernel.

    Args:
        divergence: the name above.
        beta: the JSD's teacher weight, in (0, 1) (0.5: the symmetric JSD). JSD / beta -> KL(p || q) as beta -> 0 and
            JSD / (1 - beta) -> KL(q || p) as beta -> 1 (docs/design.md).
        skew: the skew KLs' alpha, in [0, 1) (DistiLLM's default 0.1).
        Other arguments as in ``fused_reverse_kld``. With ``process_group`` (or DTensor logits placed ``Shard(-1)``)
            every rank returns the unsharded loss and gets its slice of the unsharded gradient; per call the ranks
            all-gather per-token numbers, never logits: once for the KLs (6 a token), twice for the mixtures and
            the TVD (the 4 row statistics, then 2 partial sums), see ``parallel.py``; backends "cpu" and "triton".

    Returns:
        The loss, float32 (float64 if either logits tensor is float64). Logits holding NaN give NaN.
    """
    check_reduction(reduction)
    divergence, coefficient = divergence_coefficient(divergence, beta, skew)
    if divergence == "reverse_kl":  # (its single-pass kernels)
        return fused_reverse_kld(student_logits, teacher_logits, mask=mask, temperature=temperature,
                                 reduction=reduction, vocab_size=vocab_size, backend=backend,
                                 process_group=process_group)
    shards, (student_logits, teacher_logits) = logits_shards(
        process_group, student_logits=student_logits, teacher_logits=teacher_logits)
    rows = validate_logits(student_logits, teacher_logits, None, mask, temperature, vocab_size, backend, shards)
    if shards is None:
        per_token = divergence_ops.differentiable_divergence(
            rows.student, rows.teacher, rows.mask, divergence, coefficient, 1.0 / rows.temperature, rows.vocab_size,
            rows.backend)[0]
    else:
        per_token = parallel.logits_divergence(shards, rows.student, rows.teacher, rows.mask, divergence, coefficient,
                                               rows.temperature, rows.vocab_size, rows.backend)
    return reduce_per_token(per_token, rows.mask, rows.lead_shape, reduction)


def fused_token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    mix_alpha: float = 0.0,
    weight_clip: Optional[tuple[float, float]] = None,
    with_entropy: bool = False,
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> TokenStats:
    """Every per-token MiniLLM term for sampled tokens ``target_ids``, from one pass over the logits.

    With q = softmax(s / T), p = softmax(t / T) over the first ``vocab_size`` columns and y_t the target:
        reverse_kld       KL_t = sum_v q_v (log q_v - log p_v)
        student_logprob   log q(y_t)          teacher_logprob   log p(y_t)
        log_ratio         r_t = log p(y_t) - log q(y_t)                      (detached)
        importance_weight w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t)),
                          clipped to ``weight_clip = (lo, hi)`` if given     (detached)
        entropy           H_t = -sum_v q_v log q_v   (if ``with_entropy``)
    Gradients flow to the student logits through reverse_kld, student_logprob and entropy:
        d/ds_v = (1/T)(a q_v (log q_v - log p_v - KL_t) + b ([v = y_t] - q_v) - c q_v (log q_v + H_t))
    with a, b, c the upstream gradients of the three, in one backward pass.

    Args:
        target_ids: integer ``[...]`` token ids in ``[0, vocab_size)`` where the mask is True
            (masked positions may hold anything, e.g. -100).
        mix_alpha: alpha in [0, 1] of the teacher-mixed sampling distribution (0: w = 1).
        weight_clip: optional ``(lo, hi)`` with 0 <= lo <= hi.
        Other arguments as in ``fused_reverse_kld`` (with ``process_group``, ``target_ids`` are global ids and
        every rank gets the same ``TokenStats``).

    Returns:
        ``TokenStats`` of ``[...]`` tensors (float32; float64 if either logits tensor is float64), 0 where masked.
    """
    mix_alpha, weight_clip = check_sampling_args(target_ids, mix_alpha, weight_clip)
    shards, (student_logits, teacher_logits) = logits_shards(
        process_group, student_logits=student_logits, teacher_logits=teacher_logits)
    rows = validate_logits(student_logits, teacher_logits, target_ids, mask, temperature, vocab_size, backend, shards)
    kl, student_logprob, teacher_logprob, entropy = _token_stats(rows, shards)
    return assemble_token_stats(
        kl, student_logprob, teacher_logprob, entropy if with_entropy else None,
        rows.mask, rows.lead_shape, mix_alpha, weight_clip,
    )


def _token_stats(rows: LogitsCall, shards: Optional[parallel.VocabShards] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, student_logprob, teacher_logprob, entropy)`` per row, ``[N]``, from the chosen backend (over the
    vocabulary the ranks of ``shards`` hold together, if given)."""
    if shards is not None:
        return parallel.logits_token_stats(shards, rows.student, rows.teacher, rows.target, rows.mask, rows.temperature,
                                           rows.vocab_size, rows.backend)
    kl, student_logprob, teacher_logprob, entropy, _ = ops.differentiable_token_stats(
        rows.student, rows.teacher, rows.target, rows.mask, 1.0 / rows.temperature, rows.vocab_size, rows.backend
    )
    return kl, student_logprob, teacher_logprob, entropy


# ---------------------------------------------------------------------------------------------------------------
# A sparse teacher: K (id, log p) pairs per token, the rest of its distribution (the tail R) completed by ``tail``:
# "bin" (the tail as one outcome, the smallest value any completion gives), "uniform" (the tail mass spread evenly)
# or "renormalized" (both models restricted to the K ids, as truncated top-k distillation does).
# ---------------------------------------------------------------------------------------------------------------
def fused_sparse_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    tail: str = "bin",
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """A divergence D(p, q) of the student q from a teacher p given as its top-k log-probabilities, per token, fused.

    With q = softmax(s / T) over the first ``vocab_size`` columns, I the ids of a token's live entries (log p > -inf),
    R the other columns, P_R = 1 - sum_I p_k and Q_R = sum_R q_v, ``tail`` completes the teacher on R:
        "bin"           the divergence over the K' + 1 outcomes (p_I, P_R) vs (q_I, Q_R); it equals the full-vocabulary
                        divergence against p_v = P_R q_v / Q_R on R, the smallest value of any completion
        "uniform"       the full-vocabulary divergence against p_v = P_R / (V - K') on R
        "renormalized"  the divergence of both models restricted to I and renormalised (truncated top-k)
    and ``divergence`` is one of ``fused_divergence``'s (reverse_kl, forward_kl, jsd, skew_forward_kl,
    skew_reverse_kl, tvd; terms whose leading probability is 0 count 0). The gradient reaches every student logit
    (bin: the tail's through Q_R; renormalized: those of I only):
        dD/ds_v = (1/T) q_v (a_v - sum_u q_u a_u),   a_v = dD/dq_v   (no T^2 factor).
    Passes over a row: one forward ("uniform": two; "renormalized" reads only the K columns), one backward.

    Args:
        student_logits: ``[..., V_s]`` float logits of the student, leading dimensions of any strides (as
            ``fused_reverse_kld`` takes them). The gradient is a fresh contiguous tensor of this shape.
        teacher_ids: integer ``[..., K]`` (int32 or int64) ids of the teacher's entries, the student's leading shape.
            In each row the mask keeps, the ids of live entries lie in [0, vocab_size) and do not repeat.
        teacher_logprobs: ``[..., K]`` float (any float dtype) log-probabilities of those ids, normalised over the
            teacher's full vocabulary (e.g. ``topk_teacher``); -inf marks "no entry" (whatever its id), for rows with
            fewer than K. They are taken as given: ``temperature`` does not apply to them. Frozen (no gradient).
        divergence, beta, skew: as in ``fused_divergence`` (a skew of 0 is the plain KL).
        tail: "bin", "uniform" or "renormalized" (above).
        temperature: T > 0, applied to the student only.
        mask, reduction, vocab_size, backend: as in ``fused_reverse_kld`` (``vocab_size``: the real vocabulary when
            the student's logits are padded; 1 <= K <= vocab_size).
        process_group: the student's vocabulary sharded over this group's P ranks, as in ``fused_reverse_kld``
            (DTensor logits placed ``Shard(-1)`` bring their mesh's group): ``teacher_ids`` are global and
            ``teacher_ids``, ``teacher_logprobs`` and ``mask`` replicated; each rank contributes the entries whose
            ids it holds. Every rank returns the unsharded loss and gets its slice of the unsharded gradient; per call
            the ranks all-gather 4 + K numbers a token (each shard's row statistics and the logits of its entries),
            "uniform" also 2 partial sums, never the logits (``parallel.py``). The tail's terms and the gradient
            are PyTorch expressions on the shard (``[N, W]`` temporaries), not a fused kernel.

    Returns:
        The loss, float32 (float64 if the student logits or the log-probabilities are float64). NaN in a row's
        log-probabilities or in the student logits the mode reads gives NaN. ``ValueError`` in eager mode for ids out
        of range or repeated, log-probabilities above 0, or ones whose probabilities sum above 1 (by more than
        rounding: ``logprob_mass_tolerance``).
    """
    check_reduction(reduction)
    divergence, coefficient = divergence_coefficient(divergence, beta, skew)
    shards, (student_logits,) = logits_shards(process_group, student_logits=student_logits)
    teacher = validate_sparse_teacher(student_logits, teacher_ids, teacher_logprobs, None, mask, temperature,
                                      vocab_size, backend, tail, shards)
    if shards is None:
        value, _, _ = sparse_ops.sparse_rows(teacher.student, teacher.ids, teacher.logprobs, None, teacher.mask,
                                             divergence, tail, coefficient, teacher.temperature, teacher.vocab_size,
                                             teacher.backend)
    else:
        value, = parallel.logits_sparse_divergence(shards, teacher.student, teacher.ids, teacher.logprobs, None,
                                                   teacher.mask, divergence, tail, coefficient, teacher.temperature,
                                                   teacher.vocab_size, teacher.backend)
    return reduce_per_token(value, teacher.mask, teacher.lead_shape, reduction)


def fused_sparse_token_stats(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    target_ids: torch.Tensor,
    target_teacher_logprobs: torch.Tensor,
    *,
    tail: str = "bin",
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    mix_alpha: float = 0.0,
    weight_clip: Optional[tuple[float, float]] = None,
    with_entropy: bool = False,
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> TokenStats:
    """Every per-token MiniLLM term of sampled tokens ``target_ids`` against a sparse teacher, from one pass.

    As ``fused_token_stats``, with the teacher given as its top-k (``fused_sparse_divergence``'s ``teacher_ids``,
    ``teacher_logprobs``, ``tail``) and the teacher's log-probability of each sampled token given separately (a served
    teacher returns it beside its top-k; the token need not be among them):
        reverse_kld       KL_t of ``fused_sparse_divergence(divergence="reverse_kl", tail=tail)``
        student_logprob   log q(y_t)              teacher_logprob   ``target_teacher_logprobs`` (detached)
        log_ratio         log p(y_t) - log q(y_t)                                 (detached)
        importance_weight q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t)), clipped  (detached)
        entropy           H_t = -sum_v q_v log q_v over the vocabulary (if ``with_entropy``)
    Gradients flow to the student logits through reverse_kld, student_logprob and entropy, in one backward pass:
        d/ds_v = (1/T)(a q_v (a_v - sum_u q_u a_u) + b ([v = y_t] - q_v) - c q_v (log q_v + H_t)).

    Args:
        target_ids: integer ``[...]`` ids in [0, vocab_size) where the mask is True.
        target_teacher_logprobs: float ``[...]``, the teacher's log p(y_t), normalised as ``teacher_logprobs``.
        mix_alpha, weight_clip, with_entropy: as in ``fused_token_stats``.
        Other arguments as in ``fused_sparse_divergence`` (with ``process_group``, ``target_ids`` are global ids and
        replicated, as is ``target_teacher_logprobs``; the shards' all-gather carries 2 more numbers a token, s_y from
        its owner and each shard's entropy).

    Returns:
        ``TokenStats`` of ``[...]`` tensors (float32; float64 if the student logits or the log-probabilities are
        float64), 0 where masked.
    """
    mix_alpha, weight_clip = check_sampling_args(target_ids, mix_alpha, weight_clip)
    shards, (student_logits,) = logits_shards(process_group, student_logits=student_logits)
    teacher = validate_sparse_teacher(student_logits, teacher_ids, teacher_logprobs, target_ids, mask, temperature,
                                      vocab_size, backend, tail, shards)
    check_companion("target_teacher_logprobs", target_teacher_logprobs, teacher.lead_shape, teacher.student.device,
                     "logits")
    if not target_teacher_logprobs.is_floating_point():
        raise TypeError(f"target_teacher_logprobs must be a float tensor, got {target_teacher_logprobs.dtype}")
    if shards is None:
        kl, student_logprob, entropy = sparse_ops.sparse_rows(
            teacher.student, teacher.ids, teacher.logprobs, teacher.target, teacher.mask, "reverse_kl", tail, 0.0,
            teacher.temperature, teacher.vocab_size, teacher.backend)
    else:
        kl, student_logprob, entropy = parallel.logits_sparse_divergence(
            shards, teacher.student, teacher.ids, teacher.logprobs, teacher.target, teacher.mask, "reverse_kl", tail,
            0.0, teacher.temperature, teacher.vocab_size, teacher.backend, target_teacher_logprobs.reshape(-1))
    teacher_logprob = target_teacher_logprobs.detach().reshape(-1).to(kl.dtype)
    if teacher.mask is not None:
        teacher_logprob = torch.where(teacher.mask, teacher_logprob, 0.0)
    return assemble_token_stats(kl, student_logprob, teacher_logprob, entropy if with_entropy else None,
                                teacher.mask, teacher.lead_shape, mix_alpha, weight_clip)


def topk_teacher(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, *,
                 vocab_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse teacher of dense logits: ``(ids, logprobs)``, each ``[..., k]``, the k largest of
    log p = log_softmax(t[..., :vocab_size] / T) (normalised over the whole vocabulary, then truncated), in
    decreasing order; ids int64, log-probabilities float32 (float64 for float64 logits). No gradient (the teacher is
    frozen). What a cache stores and ``fused_sparse_divergence`` takes."""
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError(f"teacher_logits must be a floating-point tensor, got {type(teacher_logits).__name__}"
                        + (f" {teacher_logits.dtype}" if isinstance(teacher_logits, torch.Tensor) else ""))
    if teacher_logits.dim() == 0 or teacher_logits.shape[-1] == 0:
        raise ValueError(f"teacher_logits must have shape [..., V] with V >= 1, got {tuple(teacher_logits.shape)}")
    width = teacher_logits.shape[-1]
    vocab = width if vocab_size is None else as_int("vocab_size", vocab_size, 1, width)
    k = as_int("k", k, 1, vocab)
    as_real("temperature", temperature, 0.0, open_low=True)
    with torch.no_grad():
        dtype = compute_dtype(teacher_logits.dtype)
        logprobs = torch.log_softmax(teacher_logits[..., :vocab].to(dtype) / temperature, dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
    return ids, values
