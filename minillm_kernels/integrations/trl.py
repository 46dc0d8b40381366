"""TRL's ``DistillationTrainer`` with its loss on this package's kernels: change the import, keep the rest.

    from minillm_kernels.integrations.trl import DistillationTrainer   # instead of `from trl import ...`
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...), ...)
    trainer.train()

The class is TRL's own (a subclass: same arguments, generation, logging, checkpoints) with one function replaced:
TRL 1.16's ``_chunked_divergence_loss`` (the generalized JSD from both models' hidden states and lm_heads, on tiles)
by ``chunked_divergence_loss`` (``mk.fused_linear_divergence``). TRL's experimental trainers are in
``trl_experimental.py`` (``GKDTrainer``, ``ServerDistillationTrainer``), which imports ``trl.experimental``.

The divergence is TRL's ``beta`` (its config's) in TRL's convention, which is ours: beta = 0 is the forward KL
KL(p || q), beta = 1 the reverse KL KL(q || p), else the generalized JSD beta KL(p || m) + (1 - beta) KL(q || m),
m = beta p + (1 - beta) q (p the teacher, q the student; ``divergence_arguments``). ``divergence=`` picks another of
ours instead, which TRL lacks: "skew_forward_kl", "skew_reverse_kl" (with ``skew=``), "tvd". The reduction is TRL's,
``num_items_in_batch`` included (the micro-batch's sum over the global token count: correct under gradient
accumulation), and so is the logged entropy.

Logit transforms, as TRL reads them from each model's config, applied exactly (gradient included) in TRL's order, the
scale a first, then the soft cap c, then the temperature T: z -> c tanh(a z / c) / T. The scale (Cohere's
``logit_scale``, Falcon-H1's ``lm_head_multiplier``, Granite's 1 / ``logits_scaling``) goes through the temperature,
the soft cap (Gemma-2's ``final_logit_softcapping``) through the fused-linear functions' ``student_softcap`` /
``teacher_softcap`` (``fold_logit_scales``).

This module imports TRL, and only the version the ``trl`` extra pins (``TESTED_TRL_VERSIONS``): the subclass replaces
a private TRL function, and each TRL quirk reproduced here is named where it is handled.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, NamedTuple, Optional, Union

import torch

import minillm_kernels as mk
from minillm_kernels import reference
from minillm_kernels.validation import as_real, as_skew, as_softcap

TESTED_TRL_VERSIONS = ("1.16.0",)  # what pyproject's `trl` extra pins and tests/test_trl.py runs
try:
    import trl
except ImportError as error:
    raise ImportError(f"minillm_kernels.integrations.trl needs TRL {TESTED_TRL_VERSIONS[-1]}, which is not installed: "
                      "pip install 'minillm-kernels[trl]'") from error
if trl.__version__ not in TESTED_TRL_VERSIONS:
    raise ImportError(f"minillm_kernels.integrations.trl replaces private parts of TRL's trainers and is tested "
                      f"with TRL {', '.join(TESTED_TRL_VERSIONS)} only; the installed TRL is {trl.__version__}: "
                      f"pip install 'minillm-kernels[trl]' (trl=={TESTED_TRL_VERSIONS[-1]})")
import trl.trainer.distillation_trainer as trl_distillation  # noqa: E402

__all__ = [
    "DistillationTrainer",
    "TESTED_TRL_VERSIONS",
    "chunked_divergence_loss",
    "divergence_arguments",
    "fold_logit_scales",
    "student_entropy_sum",
]

Number = Union[int, float, torch.Tensor]


def divergence_arguments(beta: float, divergence: Optional[str] = None, skew: float = 0.1) -> dict[str, Any]:
    """The ``divergence=`` (and ``beta=`` / ``skew=``) keyword arguments of our loss functions for a TRL trainer.

    ``divergence`` None: TRL's, from its ``beta``: 0 -> "forward_kl" (KL(p || q)), 1 -> "reverse_kl" (KL(q || p)),
    else "jsd" with that beta (the same convention: m = beta p + (1 - beta) q). Otherwise ``divergence`` itself, one of
    ``reference.DIVERGENCES``: "jsd" takes ``beta`` (then in (0, 1)), the skew KLs ``skew``.
    """
    if divergence is None:
        beta = as_real("beta", beta, 0.0, 1.0)
        if beta == 0.0:
            return dict(divergence="forward_kl")
        if beta == 1.0:
            return dict(divergence="reverse_kl")
        return dict(divergence="jsd", beta=beta)
    if divergence not in reference.DIVERGENCES:
        raise ValueError(f"divergence must be None (TRL's, from its beta) or one of {reference.DIVERGENCES}, "
                         f"got {divergence!r}")
    if divergence == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"divergence='jsd' takes the config's beta, which must lie in (0, 1), got {beta}: TRL's "
                             "beta 0 and 1 are the forward and the reverse KL (leave divergence=None for those)")
        return dict(divergence="jsd", beta=beta)
    if divergence.startswith("skew_"):
        return dict(divergence=divergence, skew=as_skew(skew))
    return dict(divergence=divergence)


class FoldedLogitScales(NamedTuple):
    """The fused-linear inputs that apply both models' logit scales and soft caps (``fold_logit_scales``)."""

    temperature: float
    teacher_hidden: torch.Tensor
    teacher_bias: Optional[torch.Tensor]
    student_softcap: Optional[float]
    teacher_softcap: Optional[float]


def fold_logit_scales(temperature: float, student_logit_scale: float, teacher_logit_scale: float,
                      teacher_hidden: torch.Tensor, teacher_bias: Optional[torch.Tensor],
                      student_softcap: Optional[float] = None,
                      teacher_softcap: Optional[float] = None) -> FoldedLogitScales:
    """Both models' logit scales applied through the kernels' one temperature and their soft caps, exactly.

    A model that multiplies its logits s by a scale a before the softmax at temperature T has
        softmax(a s / T) = softmax(s / T'),   T' = T / a,
    so the student's scale a_s becomes the temperature T' = T / a_s, gradient included: the kernels' chain factor
    1 / T' = a_s / T is d(a_s s / T) / ds. The teacher's logits t must then be scaled by r = a_t / a_s, as
    a_t t / T = r t / T': r t = (r h_t) W_t^T + r b_t, so its hidden states ``[..., H_t]`` and bias ``[V]`` are
    multiplied by r (the teacher gets no gradient), in float32 or wider, so that the per-chunk cast to the weight's
    dtype rounds once, as without a scale. With r = 1 (the same scale in both, or none) nothing is copied.

    A soft cap c applied after the scale (TRL's order, z -> c tanh(a z / c)) is a cap of c / a on the unscaled
    logits, times a: c tanh(a z / c) = a (c / a) tanh(z / (c / a)). So the student's becomes the kernels'
    ``student_softcap`` c_s / a_s on s, and the teacher's, on the teacher's logits r t, c_t / a_s:
    (c_t / a_s) tanh(r t a_s / c_t) / T' = c_t tanh(a_t t / c_t) / T.

    Scales are finite and > 0 (TRL reads them from the configs: ``logit_scale``, ``output_multiplier``,
    ``lm_head_multiplier``, 1 / ``logits_scaling``), caps None or finite and > 0 (``final_logit_softcapping``).
    """
    hint = (" (TRL reads it from the model's config: logit_scale, output_multiplier, lm_head_multiplier or "
            "1 / logits_scaling; the scale folds into the temperature, which must stay finite and > 0)")
    student_logit_scale = as_real("student_logit_scale", student_logit_scale, 0.0, open_low=True, hint=hint)
    teacher_logit_scale = as_real("teacher_logit_scale", teacher_logit_scale, 0.0, open_low=True, hint=hint)
    ratio = teacher_logit_scale / student_logit_scale
    if ratio != 1.0:
        wide = torch.promote_types(teacher_hidden.dtype, torch.float32)
        teacher_hidden = teacher_hidden.to(wide) * ratio
        teacher_bias = None if teacher_bias is None else teacher_bias.to(wide) * ratio
    softcaps = (None if cap is None else as_softcap(name, cap) / student_logit_scale
                for name, cap in (("student_final_logit_softcapping", student_softcap),
                                  ("teacher_final_logit_softcapping", teacher_softcap)))
    return FoldedLogitScales(temperature / student_logit_scale, teacher_hidden, teacher_bias, *softcaps)


def _gathered_head(weight: torch.Tensor, bias: Optional[torch.Tensor],
                   dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """An lm_head as plain tensors. Under FSDP2 its weight is a DTensor sharded over the data-parallel ranks, whose
    tokens differ (not the vocabulary-parallel layout the kernels' own DTensor support assumes): as TRL 1.16's loss
    does, it is gathered once (``full_tensor``, whose backward reduce-scatters the gradient) and cast to the hidden
    states' dtype (under mixed precision the gathered weight is the float32 master copy)."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor().to(dtype)
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def student_entropy_sum(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                        student_bias: Optional[torch.Tensor], mask: torch.Tensor, temperature: float = 1.0, *,
                        softcap: Optional[float] = None, backend: str = "auto",
                        chunk_size: Optional[int] = None) -> torch.Tensor:
    """sum over the tokens ``mask`` keeps of the student's entropy H_t = -sum_v q_v log q_v, q = softmax(s / T),
    s = h W^T + b (hidden states ``[..., H]``, weight ``[V, H]``, mask the leading shape; with a ``softcap`` c,
    s = c tanh(z / c) of z = h W^T + b), without the [N, V] logits and without a gradient: what TRL's
    DistillationTrainer logs as ``entropy`` (over the token count). One no-grad pass of ``fused_linear_token_stats``
    with the student as its own teacher (the student's matmul twice per chunk: the fused-linear divergence returns no
    entropy)."""
    student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
    student_bias = None if student_bias is None else student_bias.detach()
    with torch.no_grad():
        stats = mk.fused_linear_token_stats(
            student_hidden, student_weight, student_hidden, student_weight, torch.zeros_like(mask, dtype=torch.long),
            student_bias=student_bias, teacher_bias=student_bias, mask=mask, temperature=temperature,
            student_softcap=softcap, teacher_softcap=softcap, with_entropy=True, backend=backend, chunk_size=chunk_size,
        )
    return stats.entropy.sum()


def divide_by_count(total: torch.Tensor, count: Number) -> torch.Tensor:
    """``total / count``, a tensor ``count`` moved to ``total``'s device first (TRL's ``num_items_in_batch``)."""
    return total / (count.to(total.device) if isinstance(count, torch.Tensor) else count)


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: Optional[Number] = None,
    student_lm_head_bias: Optional[torch.Tensor] = None,
    teacher_lm_head_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
    *,
    divergence: Optional[str] = None,
    skew: float = 0.1,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    log_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16's ``_chunked_divergence_loss`` (same arguments, same results) on ``mk.fused_linear_divergence``.

    With s = c_s tanh(a_s z_s / c_s), z_s = h_s W_s^T + b_s (a: the logit scale, c: the ``final_logit_softcapping``,
    without it s = a_s z_s; ``fold_logit_scales``), likewise t, q = softmax(s / T), p = softmax(t / T) and D_t the
    divergence of ``divergence_arguments(beta, divergence, skew)``:
        loss = sum_t D_t / num_items_in_batch    (or / max(1, the tokens counted) when it is None),
    the sum over the tokens ``completion_mask`` ([B, K], nonzero = counts) keeps. Hidden states ``[B, K, H]``
    (each model its own H), lm_head weights ``[V, H]``.

    Returns:
        ``(loss, entropy_sum, n_valid)``: the loss (float32 scalar, gradients to the student's hidden states, weight
        and bias), the summed student entropy of the counted tokens (``student_entropy_sum``, detached; NaN when
        ``log_entropy`` is False) and their count, all over this micro-batch.
    """
    student_lm_head_weight, student_lm_head_bias = _gathered_head(student_lm_head_weight, student_lm_head_bias,
                                                                  student_hidden_states.dtype)
    teacher_lm_head_weight, teacher_lm_head_bias = _gathered_head(teacher_lm_head_weight, teacher_lm_head_bias,
                                                                  teacher_hidden_states.dtype)
    # TRL 1.16 leaves the teacher's parameters requiring grad (it runs the teacher's backbone under no_grad, and its
    # loss gives the lm_head no gradient): detached here, as the kernels expect a frozen teacher.
    teacher_lm_head_bias = None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach()
    folded = fold_logit_scales(temperature, student_logit_scale, teacher_logit_scale, teacher_hidden_states.detach(),
                               teacher_lm_head_bias, student_final_logit_softcapping, teacher_final_logit_softcapping)
    mask = completion_mask != 0
    total = mk.fused_linear_divergence(
        student_hidden_states, student_lm_head_weight, folded.teacher_hidden, teacher_lm_head_weight.detach(),
        student_bias=student_lm_head_bias, teacher_bias=folded.teacher_bias, mask=mask,
        temperature=folded.temperature, student_softcap=folded.student_softcap,
        teacher_softcap=folded.teacher_softcap, reduction="sum", backend=backend, chunk_size=chunk_size,
        **divergence_arguments(beta, divergence, skew),
    )
    n_valid = mask.sum()
    # TRL 1.16: without num_items_in_batch, the mean over the local tokens, their count clamped at 1 so that a fully
    # masked micro-batch gives 0 (with a graph: DDP's backward must still run), not 0 / 0.
    loss = divide_by_count(total, n_valid.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    if log_entropy:
        entropy_sum = student_entropy_sum(student_hidden_states, student_lm_head_weight, student_lm_head_bias, mask,
                                          folded.temperature, softcap=folded.student_softcap, backend=backend,
                                          chunk_size=chunk_size)
    else:
        entropy_sum = total.new_full((), math.nan)
    return loss, entropy_sum, n_valid


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    """``module.name`` is ``value`` inside the block, restored on exit (a module attribute: not for threads that call
    into TRL at the same time)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class KernelOptions(NamedTuple):
    """The options the trainers here add to TRL's arguments, checked when the trainer is made."""

    divergence: Optional[str]  # None: TRL's, from its config's beta
    skew: float
    backend: str

    @classmethod
    def checked(cls, beta: float, divergence: Optional[str], skew: float, backend: str) -> "KernelOptions":
        divergence_arguments(beta, divergence, skew)  # raises now, not at the first step
        return cls(divergence, skew, backend)


class DistillationTrainer(trl.DistillationTrainer):
    """TRL's ``DistillationTrainer`` with its loss on ``mk.fused_linear_divergence`` (``chunked_divergence_loss``).

    Arguments: TRL's, and (keyword-only)
        divergence: None (TRL's, from ``args.beta``) or one of ``reference.DIVERGENCES`` (``divergence_arguments``).
        skew: the skew KLs' weight of the leading model in their mixture, in [0, 1).
        backend: our backend ("auto": the C++ kernel on the CPU, Triton or CUDA on a GPU).
        chunk_size: tokens per chunk of the fused-linear loop (default: from V, the dtype and free memory).
        log_entropy: log the student's entropy as TRL does (one more no-grad pass of the student's matmul per step,
            ``student_entropy_sum``); False leaves the metric NaN.
    Each model's logit scale and ``final_logit_softcapping`` are read from its config by TRL and applied exactly
    (``fold_logit_scales``).
    """

    def __init__(self, *args: Any, divergence: Optional[str] = None, skew: float = 0.1, backend: str = "auto",
                 chunk_size: Optional[int] = None, log_entropy: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_options = KernelOptions.checked(self.beta, divergence, skew, backend)
        self.kernel_chunk_size = chunk_size
        self.log_entropy = log_entropy

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL 1.16's _compute_loss runs both backbones, reads the lm_heads and the logit transforms from the configs,
        # then calls its module's `_chunked_divergence_loss` by name: that one call is ours for its duration.
        options = self.kernel_options
        loss = functools.partial(chunked_divergence_loss, divergence=options.divergence, skew=options.skew,
                                 backend=options.backend, chunk_size=self.kernel_chunk_size,
                                 log_entropy=self.log_entropy)
        with _replaced(trl_distillation, "_chunked_divergence_loss", loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
