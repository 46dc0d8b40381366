"""Validation, in one place, for every public function (``losses.py``, ``fused_linear.py``).

The argument checks (``validate_logits``, ``validate_token_args``, ``check_*``: each error names the argument and
the fix), the reductions (``reduce_per_token``), the ``TokenStats`` the token-level functions return; the backend
each call runs on is ``backends.choose_backend``'s.

"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch

from minillm_kernels import parallel, reference
from minillm_kernels._arguments import as_beta, as_int, as_number, as_real, as_skew, as_temperature
from minillm_kernels.backends import choose_backend

REDUCTIONS = ("none", "sum", "mean")


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


class LogitsCall(NamedTuple):
    """Validated inputs: the logits as given (N rows: their leading dimensions), the per-token tensors flattened."""

    student: torch.Tensor  # [..., V_s], last-dim stride 1, leading dims of any strides
    teacher: torch.Tensor  # [..., V_t], the same leading shape, last-dim stride 1, its own strides
    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str
    temperature: float


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` itself when its last dimension has stride 1, whatever the leading dimensions' strides (the
    kernels take those as they are), else a contiguous copy."""
    return logits if logits.stride(-1) == 1 or logits.shape[-1] == 1 else logits.contiguous()


def _check_companion(name: str, x: object, lead_shape: torch.Size, device: torch.device, inputs: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.shape != lead_shape:
        raise ValueError(f"{name} must have the {inputs}' leading shape {tuple(lead_shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the {inputs} are on {device}")


def validate_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    backend: str,
    shards: Optional[parallel.VocabShards] = None,
) -> LogitsCall:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )
    lead_shape = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead_shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must agree on every dimension but the last"
        )
    args = validate_token_args(
        lead_shape, student_logits.device, torch.promote_types(student_logits.dtype, teacher_logits.dtype),
        {"student_logits": student_logits.shape[-1], "teacher_logits": teacher_logits.shape[-1]},
        target_ids, mask, temperature, vocab_size, backend, inputs="logits", shards=shards,
    )
    teacher_logits = frozen_teacher(teacher_logits, "teacher_logits")
    return LogitsCall(_unit_column_stride(student_logits), _unit_column_stride(teacher_logits), *args)


_warned_about_teacher_grad = False


def frozen_teacher(teacher: torch.Tensor, name: str) -> torch.Tensor:
    """``teacher.detach()``: the teacher gets no gradient. A teacher tensor that requires grad is warned about
    once per process (it usually means the teacher ran with autograd on, keeping its whole graph alive)."""
    global _warned_about_teacher_grad
    if teacher.requires_grad and not _warned_about_teacher_grad and not torch.compiler.is_compiling():
        _warned_about_teacher_grad = True
        warnings.warn(
            f"{name} requires grad, but the teacher is frozen and gets no gradient; compute it under "
            f"torch.no_grad() (or pass {name}.detach()) to free its autograd graph. Warned once.",
            UserWarning, stacklevel=4,
        )
    return teacher.detach()


class TokenArgs(NamedTuple):
    """The validated per-token arguments (the tail of ``LogitsCall``), for any producer of the logits."""

    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str
    temperature: float  # a Python float, whatever number type was given


def validate_token_args(
    lead_shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
    vocab_widths: dict[str, int],
    target_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    backend: str,
    *,
    inputs: str,
    shards: Optional[parallel.VocabShards] = None,
) -> TokenArgs:
    """Checks what the logits-level and fused-linear functions share, once the logits' leading shape, device,
    dtype and vocabulary widths are known. ``vocab_widths`` maps the student's then the teacher's argument name
    to its vocabulary width (logits columns, or weight rows); ``inputs`` names the tensors that fix the leading
    shape and device ("logits", "hidden states") in the messages. With ``shards`` the widths are local, equal for
    both models, and ``vocab_size`` and the ids are global (up to the ranks' widths together)."""
    (student_name, student_width), (teacher_name, teacher_width) = vocab_widths.items()
    vocab_name = "vocab_size"
    if shards is not None:
        if student_width != teacher_width:
            raise ValueError(
                f"with a process group, {student_name} and {teacher_name} must cover the same vocabulary columns: "
                f"rank r holds global columns [r W, (r + 1) W) of both, but their local widths are {student_width} "
                f"and {teacher_width}; pad both models' vocabularies to the same size"
            )
        vocab_name = f"vocab_size (global: {shards.world} ranks x {student_width} columns at most)"
        student_width = teacher_width = shards.world * student_width
    if vocab_size is None:
        if student_width != teacher_width:
            raise ValueError(
                f"{student_name} has {student_width} vocab entries and {teacher_name} {teacher_width}; "
                "pass vocab_size= (the real vocabulary size) to compare padded logits"
            )
        vocab_size = student_width
    else:  # (at most the narrower width: the real vocabulary fits in both)
        vocab_size = as_int(vocab_name, vocab_size, 1, min(student_width, teacher_width))
    temperature = as_temperature(temperature, reference.compute_dtype(dtype))
    if mask is not None:
        _check_companion("mask", mask, lead_shape, device, inputs)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = the token counts), got {mask.dtype}")
        mask = mask.reshape(-1).contiguous()
    if target_ids is not None:
        _check_companion("target_ids", target_ids, lead_shape, device, inputs)
        if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
            raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
        target_ids = target_ids.reshape(-1).to(torch.int64).contiguous()
        # A data-dependent check: skipped while tracing (the kernels then give NaN log-probabilities for an
        # out-of-range id) and on meta tensors (no data).
        if not torch.compiler.is_compiling() and device.type != "meta":
            counted = target_ids if mask is None else target_ids[mask]
            if counted.numel() and not bool(((counted >= 0) & (counted < vocab_size)).all()):
                raise ValueError(
                    f"target_ids must lie in [0, vocab_size={vocab_size}) where the mask is True; "
                    f"got values in [{int(counted.min())}, {int(counted.max())}]"
                )
    return TokenArgs(target_ids, mask, lead_shape, vocab_size, choose_backend(backend, device, dtype, vocab_size),
                     temperature)


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


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


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


def check_divergence_args(divergence: str, beta: float, skew: float) -> tuple[float, float]:
    """``(beta, skew)`` as floats, after checking them and the divergence's name. While torch.compile traces, only
    their types: a failing range check cannot raise then (the graph would break), so the ops check the coefficient
    their divergence uses when the graph runs, with the same ValueError (``ops.divergence.check_coefficient``)."""
    if divergence not in reference.DIVERGENCES:
        raise ValueError(f"divergence must be one of {reference.DIVERGENCES}, got {divergence!r}")
    if torch.compiler.is_compiling():
        return as_number("beta", beta), as_number("skew", skew)
    return as_beta(beta), as_skew(skew)


def logits_shards(process_group, student_logits, teacher_logits):
    """``(shards or None, (student_logits, teacher_logits) as this rank's local tensors)``: ``parallel.vocab_shards``
    of a logits-level call."""
    shards, logits = parallel.vocab_shards(
        process_group, {"student_logits": (student_logits, -1), "teacher_logits": (teacher_logits, -1)})
    return shards, logits


def check_sampling_args(
    target_ids: Optional[torch.Tensor], mix_alpha: float, weight_clip: Optional[tuple[float, float]]
) -> tuple[float, Optional[tuple[float, float]]]:
    """``(mix_alpha, weight_clip)`` as floats, after checking them and that ``target_ids`` is given."""
    mix_alpha = as_real("mix_alpha", mix_alpha, 0.0, 1.0)
    if weight_clip is not None:
        if not isinstance(weight_clip, (tuple, list)) or len(weight_clip) != 2:
            raise ValueError(f"weight_clip must be None or a pair (lo, hi) with 0 <= lo <= hi, got {weight_clip!r}")
        low = as_real("weight_clip[0] (lo)", weight_clip[0], 0.0)
        high = as_real("weight_clip[1] (hi)", weight_clip[1], low)
        weight_clip = (low, high)
    if target_ids is None:
        raise TypeError("target_ids must be a tensor of token ids, got None")
    return mix_alpha, weight_clip


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
