"""The sparse teacher's public functions: losses against a teacher given as its top-k log-probabilities.

    fused_sparse_divergence   a divergence of the student from the teacher's top-k, the tail completed by ``tail``
    fused_sparse_token_stats  the per-token MiniLLM terms of sampled tokens against a sparse teacher
    topk_teacher              dense teacher logits -> (ids, log-probabilities): the sparse teacher

A cached or served teacher gives, per token, K pairs ``(id, log p)`` with log p normalised over its full vocabulary;
the rest of its distribution, the tail R, is unknown and ``tail=`` completes it: "bin" (default: the tail as one
outcome, the smallest value any completion gives), "uniform" (the tail mass spread evenly) or "renormalized" (both
models restricted to the K ids, as truncated top-k distillation does). docs/design.md ("The sparse teacher") has the
math, the proofs and the validation rules; the kernels are ``ops/sparse.py``'s. Validation and backend choice reuse
``dispatch.py``'s, the reductions and ``TokenStats`` too.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from minillm_kernels import reference
from minillm_kernels._arguments import as_int, as_real
from minillm_kernels.dispatch import (
    TokenStats,
    _check_companion,
    _unit_column_stride,
    assemble_token_stats,
    check_divergence_args,
    check_reduction,
    check_sampling_args,
    frozen_teacher,
    reduce_per_token,
    validate_token_args,
)
from minillm_kernels.ops import sparse as sparse_ops

__all__ = ["fused_sparse_divergence", "fused_sparse_token_stats", "topk_teacher"]


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

    Returns:
        The loss, float32 (float64 if the student logits or the log-probabilities are float64). NaN in a row's
        log-probabilities or in the student logits the mode reads gives NaN. ``ValueError`` in eager mode for ids out
        of range or repeated, log-probabilities above 0, or ones whose probabilities sum above 1 (by more than
        rounding: ``logprob_mass_tolerance``).
    """
    check_reduction(reduction)
    beta, skew = check_divergence_args(divergence, beta, skew)
    teacher = validate_sparse_teacher(student_logits, teacher_ids, teacher_logprobs, None, mask, temperature,
                                      vocab_size, backend, tail)
    value, _, _ = sparse_ops.sparse_rows(teacher.student, teacher.ids, teacher.logprobs, None, teacher.mask,
                                         divergence, tail, beta, skew, teacher.temperature, teacher.vocab_size,
                                         teacher.backend)
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
        Other arguments as in ``fused_sparse_divergence``.

    Returns:
        ``TokenStats`` of ``[...]`` tensors (float32; float64 if the student logits or the log-probabilities are
        float64), 0 where masked.
    """
    mix_alpha, weight_clip = check_sampling_args(target_ids, mix_alpha, weight_clip)
    teacher = validate_sparse_teacher(student_logits, teacher_ids, teacher_logprobs, target_ids, mask, temperature,
                                      vocab_size, backend, tail)
    _check_companion("target_teacher_logprobs", target_teacher_logprobs, teacher.lead_shape, teacher.student.device,
                     "logits")
    if not target_teacher_logprobs.is_floating_point():
        raise TypeError(f"target_teacher_logprobs must be a float tensor, got {target_teacher_logprobs.dtype}")
    kl, student_logprob, entropy = sparse_ops.sparse_rows(
        teacher.student, teacher.ids, teacher.logprobs, teacher.target, teacher.mask, "reverse_kl", tail, 0.5, 0.0,
        teacher.temperature, teacher.vocab_size, teacher.backend)
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
        dtype = reference.compute_dtype(teacher_logits.dtype)
        logprobs = torch.log_softmax(teacher_logits[..., :vocab].to(dtype) / temperature, dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
    return ids, values


# ---------------------------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------------------------
class SparseCall(NamedTuple):
    """Validated inputs: the student as given (its N rows: the leading dimensions), the teacher as ``[N, K]``
    contiguous tensors (ids int32 or int64, log-probabilities detached), the per-token tensors flattened."""

    student: torch.Tensor  # [..., V_s], last-dim stride 1, leading dims of any strides
    ids: torch.Tensor  # [N, K]
    logprobs: torch.Tensor  # [N, K]
    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str
    temperature: float  # a Python float, whatever number type was given


def validate_sparse_teacher(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    target_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    backend: str,
    tail: str,
) -> SparseCall:
    """Checks every argument the sparse functions share (docs/design.md, "Validation"), then the data-dependent ones
    in eager mode (skipped while tracing and on meta tensors) over the rows the mask keeps."""
    if tail not in reference.SPARSE_TAILS:
        raise ValueError(f"tail must be one of {reference.SPARSE_TAILS}, got {tail!r}")
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a tensor, got {type(student_logits).__name__}")
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating-point tensor, got {student_logits.dtype}")
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have shape [..., V] with V >= 1, got {tuple(student_logits.shape)}")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.device != student_logits.device:
            raise ValueError(f"{name} is on {x.device} but student_logits is on {student_logits.device}")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor (int32 or int64), got {teacher_ids.dtype}")
    if not teacher_logprobs.is_floating_point():
        raise TypeError(f"teacher_logprobs must be a floating-point tensor, got {teacher_logprobs.dtype}")
    lead_shape = student_logits.shape[:-1]
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must have the same shape [..., K]")
    if teacher_ids.dim() == 0 or teacher_ids.shape[:-1] != lead_shape or teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids and teacher_logprobs must have shape [..., K] (K >= 1) with the student's "
                         f"leading shape {tuple(lead_shape)}, got {tuple(teacher_ids.shape)}")
    width = student_logits.shape[-1]
    # (The teacher has no width of its own: its ids are checked against vocab_size, which the student's width bounds.)
    args = validate_token_args(
        lead_shape, student_logits.device, reference.compute_dtype(student_logits.dtype, teacher_logprobs.dtype),
        {"student_logits": width, "teacher_ids": width}, target_ids, mask, temperature, vocab_size, backend,
        inputs="logits",
    )
    k = teacher_ids.shape[-1]
    if k > args.vocab_size:
        raise ValueError(f"teacher_ids has K = {k} entries per token, more than vocab_size = {args.vocab_size}: a "
                         "teacher's top-k has at most one entry per column (pass k <= vocab_size to topk_teacher)")
    ids = teacher_ids.reshape(-1, k)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    logprobs = frozen_teacher(teacher_logprobs, "teacher_logprobs").reshape(-1, k)
    if not torch.compiler.is_compiling() and student_logits.device.type != "meta":
        _check_entries(ids, logprobs, args.mask, args.vocab_size)
    return SparseCall(_unit_column_stride(student_logits), ids.contiguous(), logprobs.contiguous(), *args)


def logprob_mass_tolerance(logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How far above 1 a row's sum_I p_k may lie from rounding alone, ``[N]`` float64, of ``[N, K]`` log-probabilities
    (-inf: no entry):

        tol = sum_k p_k ((1 + |log p_k|) eps_d + 8 eps_32 (1 + log V)),

    eps_d the machine epsilon of their dtype: rounding log p_k to it moves p_k by up to p_k |log p_k| eps_d / 2, and a
    float32 log-softmax over V columns errs by a few eps_32 (1 + log V) in every log-probability (its
    log-normaliser)."""
    eps = torch.finfo(logprobs.dtype).eps
    eps_32 = torch.finfo(torch.float32).eps
    log_p = logprobs.double()
    live = log_p != -math.inf
    per_entry = (1 + log_p.abs()) * eps + 8 * eps_32 * (1 + math.log(vocab_size))
    return torch.where(live, log_p.exp() * per_entry, 0.0).sum(-1)


def _check_entries(ids: torch.Tensor, logprobs: torch.Tensor, mask: Optional[torch.Tensor], vocab_size: int) -> None:
    """The data-dependent checks over the rows ``mask`` keeps: ids of live entries in range and distinct, no
    log-probability above 0, sum_I p_k <= 1 + ``logprob_mass_tolerance``. NaN log-probabilities pass (they give NaN)."""
    if mask is not None:
        ids, logprobs = ids[mask], logprobs[mask]
    if ids.numel() == 0:
        return
    live = logprobs != -math.inf
    live_ids = ids[live]
    if live_ids.numel() and not bool(((live_ids >= 0) & (live_ids < vocab_size)).all()):
        raise ValueError(f"teacher_ids must lie in [0, vocab_size={vocab_size}) where the log-probability is > -inf "
                         f"and the mask is True; got values in [{int(live_ids.min())}, {int(live_ids.max())}]")
    # Dead entries get distinct negative stand-ins, so that only live ids can repeat.
    stand_in = -1 - torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int64)
    ordered = torch.where(live, ids.to(torch.int64), stand_in).sort(-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        row = int(repeated.any(-1).nonzero()[0])
        column = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(f"teacher_ids repeat within a row (a kept row has id {column} twice): a teacher's top-k has "
                         "distinct ids; mark unused entries with a log-probability of -inf instead")
    if bool((logprobs > 0).any()):
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0), got a maximum of "
                         f"{float(logprobs.max()):.6g}: pass log_softmax(teacher_logits / T)'s top-k "
                         "(e.g. mk.topk_teacher), not logits")
    excess = torch.where(live, logprobs.double().exp(), 0.0).sum(-1) - 1
    tolerance = logprob_mass_tolerance(logprobs, vocab_size)
    over = excess > tolerance
    if bool(over.any()):
        row = int(over.nonzero()[0])
        raise ValueError(f"teacher_logprobs of a row sum, as probabilities, to 1 + {float(excess[row]):.3g}, above 1 "
                         f"by more than rounding ({float(tolerance[row]):.3g}): they must be normalised over the "
                         "teacher's full vocabulary (log_softmax of all its logits, then the top-k; not a "
                         "log_softmax of the top-k)")
