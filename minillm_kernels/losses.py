"""The losses from logits, the package's public entry points (``import minillm_kernels as mk``):

    fused_reverse_kld   KL(q || p) per token, reduced: the MiniLLM distillation loss
    fused_divergence    the divergence family: reverse and forward KL, JSD(beta), skew KLs, TVD
    fused_token_stats   every per-token MiniLLM term of sampled tokens (KL, log q(y), log p(y), w, entropy)

Each checks its arguments and picks a backend (``dispatch.py``), hands the ``[..., V]`` logits to the kernels of
its family as they are (``ops/reverse_kld.py``, ``ops/divergence.py``; any strides in the leading dimensions, only
a last dimension of stride other than 1 is copied), and reshapes the per-token ``[N]`` results back; with
``process_group`` (or DTensor logits) the vocabulary is sharded over processes (``parallel.py``). The same from
hidden states and lm_head weights, without the logits, is ``fused_linear.py``. docs/design.md has the math.
"""
from __future__ import annotations

from typing import Optional

import torch

from minillm_kernels import parallel, reference
from minillm_kernels.dispatch import (
    LogitsCall,
    TokenStats,
    assemble_token_stats,
    check_divergence_args,
    check_reduction,
    check_sampling_args,
    logits_shards,
    reduce_per_token,
    validate_logits,
)
from minillm_kernels.ops import divergence as divergence_ops
from minillm_kernels.ops import reverse_kld as ops

__all__ = ["TokenStats", "fused_divergence", "fused_reverse_kld", "fused_token_stats"]


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
    shards, (student_logits, teacher_logits) = logits_shards(process_group, student_logits, teacher_logits)
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
    beta, skew = check_divergence_args(divergence, beta, skew)
    if divergence == "reverse_kl":
        return fused_reverse_kld(student_logits, teacher_logits, mask=mask, temperature=temperature,
                                 reduction=reduction, vocab_size=vocab_size, backend=backend,
                                 process_group=process_group)
    shards, (student_logits, teacher_logits) = logits_shards(process_group, student_logits, teacher_logits)
    rows = validate_logits(student_logits, teacher_logits, None, mask, temperature, vocab_size, backend, shards)
    if shards is None:
        per_token = divergence_ops.divergence_rows(rows.student, rows.teacher, rows.mask, divergence, beta, skew,
                                                   rows.temperature, rows.vocab_size, rows.backend)
    elif skew == 0 and divergence in ("skew_forward_kl", "skew_reverse_kl"):  # (the plain KL)
        return fused_divergence(student_logits, teacher_logits, divergence=divergence.removeprefix("skew_"),
                                mask=mask, temperature=temperature, reduction=reduction, vocab_size=vocab_size,
                                backend=backend, process_group=shards.group)
    else:
        coefficient = beta if divergence == "jsd" else skew
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
    shards, (student_logits, teacher_logits) = logits_shards(process_group, student_logits, teacher_logits)
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
    if rows.backend == "reference":  # the naive formulas, on [N, V] rows (a copy where the layout needs one)
        student, teacher = (x.reshape(-1, x.shape[-1]) for x in (rows.student, rows.teacher))
        return reference.token_stats(student, teacher, rows.target, rows.mask, rows.temperature, rows.vocab_size)
    kl, student_logprob, teacher_logprob, entropy, _ = ops.differentiable_token_stats(
        rows.student, rows.teacher, rows.target, rows.mask, 1.0 / rows.temperature, rows.vocab_size, rows.backend
    )
    return kl, student_logprob, teacher_logprob, entropy
