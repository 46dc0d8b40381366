"""TRL's experimental distillation trainers with their losses on this package's kernels (``trl.py`` has the stable
``DistillationTrainer``; this module imports ``trl.experimental``, which warns that its APIs are unstable).

    from minillm_kernels.integrations.trl_experimental import GKDTrainer   # instead of trl.experimental.gkd's

==============================  =====================================================  ===============================
TRL 1.16 trainer                its loss                                               here
==============================  =====================================================  ===============================
``GKDTrainer``                  ``generalized_jsd_loss`` on both models' full logits   ``fused_divergence``
                                (log-softmaxes, their mixture: several [N, V] tensors)
``ServerDistillationTrainer``   a server's top-k (beta = 0) or top-1 (beta > 0)        ``fused_sparse_divergence``
                                log-probabilities, a (K+1)-th tail element or the      (tail "bin" / "renormalized"),
                                top-k renormalised, on a [N, V] log-softmax            on the logits, any top-k
==============================  =====================================================  ===============================

Both read the logits the models return, so any logit transform of the model (scale, softcapping) is included. The
divergence, its ``divergence=`` / ``skew=`` / ``backend=`` options and the TRL version check are ``trl.py``'s.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

import minillm_kernels as mk
from minillm_kernels.integrations.trl import KernelOptions, Number, divergence_arguments, divide_by_count
# (after trl.py, which checks the installed TRL's version)
from trl.experimental.gkd import GKDTrainer as _TrlGKDTrainer
from trl.experimental.server_distillation import ServerDistillationConfig as _TrlServerDistillationConfig
from trl.experimental.server_distillation import ServerDistillationTrainer as _TrlServerDistillationTrainer

__all__ = [
    "GKDTrainer",
    "ServerDistillationConfig",
    "ServerDistillationTrainer",
    "generalized_jsd_loss",
    "server_sparse_divergence_loss",
    "server_teacher_entries",
]

# TRL 1.16's `_add_tail_bucket` clamps the log-mass of a support at -1e-7, so that the tail outcome keeps at least
# ~1e-7 (a teacher whose float32 top-k log-probabilities sum to 1 would make the reverse KL's tail term
# Q_R log(Q_R / 0) infinite); ``server_sparse_divergence_loss`` clamps the teacher's the same way.
TRL_MAX_LOG_MASS = -1e-7


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Number] = None,
    *,
    divergence: Optional[str] = None,
    skew: float = 0.1,
    backend: str = "auto",
) -> torch.Tensor:
    """TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (same arguments, same results) on ``mk.fused_divergence``.

    Per token D_t, the divergence of ``divergence_arguments(beta, divergence, skew)`` of q = softmax(s / T) from
    p = softmax(t / T) (logits ``[..., V]``, TRL's ``[B, L, V]``), over the tokens whose ``labels`` are not -100:
        num_items_in_batch given:  sum_t D_t / num_items_in_batch
        "batchmean"                sum_t D_t / max(1, tokens counted); without labels / max(1, logits.shape[0])
                                   (TRL 1.16 divides by the first dimension there: the batch size of [B, L, V] logits)
        "sum"                      sum_t D_t
        "mean"                     sum_t D_t / (tokens counted x V) (TRL's mean over its [tokens, V] terms)
    "none" (TRL: the [tokens, V] terms) is refused: the kernels never build them.
    """
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'mean', got {reduction!r} (TRL's 'none' returns "
                         "[tokens, V] elementwise terms, which the fused kernels never build: for per-token values "
                         "use mk.fused_divergence(..., reduction='none'))")
    mask = None if labels is None else labels != -100
    total = mk.fused_divergence(student_logits, teacher_logits, mask=mask, temperature=temperature, reduction="sum",
                                backend=backend, **divergence_arguments(beta, divergence, skew))
    if num_items_in_batch is not None:
        return divide_by_count(total, num_items_in_batch)
    tokens = student_logits.shape[:-1].numel() if mask is None else mask.sum()
    if reduction == "batchmean":
        return divide_by_count(total, max(student_logits.shape[0], 1) if mask is None else tokens.clamp_min(1))
    if reduction == "mean":
        return divide_by_count(total, tokens * student_logits.shape[-1])
    return total


class GKDTrainer(_TrlGKDTrainer):
    """TRL's experimental ``GKDTrainer`` with ``generalized_jsd_loss`` on ``mk.fused_divergence`` (on the logits the
    models return, transforms included: any model). Arguments: TRL's, and ``divergence``, ``skew``, ``backend`` as in
    ``trl.DistillationTrainer``."""

    def __init__(self, *args: Any, divergence: Optional[str] = None, skew: float = 0.1, backend: str = "auto",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_options = KernelOptions.checked(self.beta, divergence, skew, backend)

    # TRL 1.16's compute_loss calls self.generalized_jsd_loss(...) without a temperature (1: its GKD applies the
    # config's temperature to sampling only) and with num_items_in_batch as transformers counts it from the collator's
    # labels, also after on-policy generation replaced them (its DistillationTrainer recounts): both kept, so that
    # the losses are TRL's.
    def generalized_jsd_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             labels: Optional[torch.Tensor] = None, beta: float = 0.5, temperature: float = 1.0,
                             reduction: str = "batchmean", num_items_in_batch: Optional[Number] = None) -> torch.Tensor:
        options = self.kernel_options
        return generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                    num_items_in_batch, divergence=options.divergence, skew=options.skew,
                                    backend=options.backend)


@dataclasses.dataclass
class ServerDistillationConfig(_TrlServerDistillationConfig):
    """TRL's ``ServerDistillationConfig`` without the limit the kernels lift: ``loss_top_k`` > 1 with ``beta`` > 0
    (TRL 1.16 computes the mixed and the reverse divergences on a top-1 support only)."""

    def __post_init__(self) -> None:
        top_k = self.loss_top_k
        if self.beta > 0:  # TRL 1.16 refuses loss_top_k != 1 here; its other checks run on the value as given
            self.loss_top_k = 1
        try:
            super().__post_init__()
        finally:
            self.loss_top_k = top_k
        if self.loss_top_k < 1:
            raise ValueError(f"loss_top_k must be at least 1 (the server returns the teacher's top-k), got "
                             f"{self.loss_top_k}")


def server_teacher_entries(
    top_k_ids: torch.Tensor, top_k_logprobs: torch.Tensor, sampled_ids: torch.Tensor, sampled_logprobs: torch.Tensor,
    *, use_top_k: bool, use_sampled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse teacher ``(ids, logprobs)``, ``[..., K']``, from what the server returns per token: its top-k
    (``[..., K]``, -inf for missing entries) if ``use_top_k``, and the sampled token's log-probability (``[...]``) if
    ``use_sampled``, as a further entry unless it is among the live top-k (then a dead one: -inf)."""
    if not use_sampled:
        return top_k_ids, top_k_logprobs
    ids, logprobs = sampled_ids.unsqueeze(-1), sampled_logprobs.unsqueeze(-1)
    if not use_top_k:
        return ids, logprobs
    in_top_k = ((top_k_ids == ids) & (top_k_logprobs > -math.inf)).any(-1, keepdim=True)
    return torch.cat((top_k_ids, ids), -1), torch.cat((top_k_logprobs, logprobs.masked_fill(in_top_k, -math.inf)), -1)


def server_sparse_divergence_loss(
    student_logits: torch.Tensor,
    teacher_result: dict[str, torch.Tensor],
    sampled_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    add_tail: bool = True,
    temperature: float = 1.0,
    divergence: Optional[str] = None,
    skew: float = 0.1,
    backend: str = "auto",
) -> torch.Tensor:
    """The ``ServerDistillationTrainer`` loss on ``mk.fused_sparse_divergence``: sum_t D_t / max(1, tokens counted),
    D_t the divergence (``divergence_arguments``) of q = softmax(s / T) (student logits ``[B, T, V]``) from the
    server's sparse teacher, over the tokens whose ``labels`` ([B, T]) are not -100.

    The teacher (``server_teacher_entries``), from ``teacher_result`` (what TRL's
    ``_get_teacher_token_logprobs_from_server`` returns: ``topk_token_ids`` / ``topk_logprobs`` [B, T, K],
    ``actual_logprobs`` [B, T], the teacher at temperature T): its
    top-k where beta < 1 or K > 1, the sampled token where beta > 0 (TRL 1.16's supports where it runs: beta = 0 the
    top-k, beta = 1 the sampled token, 0 < beta < 1 the top-1 and the sampled token; with beta > 0 and K > 1, which
    TRL refuses, both), all of them with a ``divergence`` of ours. The rest of the vocabulary: ``add_tail``, the tail
    as one outcome (tail "bin", TRL's (K+1)-th element; the teacher's entries scaled to a log-mass of at most
    ``TRL_MAX_LOG_MASS``, as TRL clamps it; the student's tail mass is exact, where TRL also clamps it at ~1e-7), else
    both models renormalised on the entries (tail "renormalized", TRL's ``loss_add_tail=False``).
    """
    required = labels != -100
    arguments = divergence_arguments(beta, divergence, skew)
    top_k = teacher_result["topk_logprobs"].shape[-1]
    use_sampled = divergence is not None or beta > 0
    use_top_k = divergence is not None or beta < 1 or top_k > 1
    # TRL 1.16 refuses a batch whose counted tokens miss a log-probability its support needs (same messages).
    if use_sampled and bool((required & ~torch.isfinite(teacher_result["actual_logprobs"])).any()):
        raise ValueError("Teacher server is missing actual-token logprobs for required reverse-KL positions")
    if use_top_k and bool((required & ~torch.isfinite(teacher_result["topk_logprobs"][..., 0])).any()):
        raise ValueError("Teacher server is missing top-1 logprobs for required forward-KL positions")
    ids, logprobs = server_teacher_entries(teacher_result["topk_token_ids"], teacher_result["topk_logprobs"],
                                           sampled_ids, teacher_result["actual_logprobs"], use_top_k=use_top_k,
                                           use_sampled=use_sampled)
    if add_tail:  # the entries scaled down to a log-mass of at most TRL_MAX_LOG_MASS (rows without entries stay)
        log_mass = torch.logsumexp(logprobs, -1, keepdim=True)
        logprobs = logprobs - (log_mass - TRL_MAX_LOG_MASS).clamp(min=0)
    total = mk.fused_sparse_divergence(student_logits, ids, logprobs, tail="bin" if add_tail else "renormalized",
                                       mask=required, temperature=temperature, reduction="sum", backend=backend,
                                       **arguments)
    return total / required.sum().clamp(min=1)


class ServerDistillationTrainer(_TrlServerDistillationTrainer):
    """TRL's experimental ``ServerDistillationTrainer`` with its loss on ``mk.fused_sparse_divergence``
    (``server_sparse_divergence_loss``): no [N, V] log-softmax, any ``loss_top_k`` with any ``beta`` (with our
    ``ServerDistillationConfig``; TRL's keeps its top-1 limit), and ``divergence``, ``skew``, ``backend`` as in
    ``trl.DistillationTrainer``. The reduction is TRL 1.16's: the mean over the micro-batch's counted tokens, divided by
    the gradient-accumulation steps (not ``num_items_in_batch``: the teacher's window may not cover every token)."""

    def __init__(self, *args: Any, divergence: Optional[str] = None, skew: float = 0.1, backend: str = "auto",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_options = KernelOptions.checked(self.beta, divergence, skew, backend)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL 1.16's compute_loss up to the student's logits: the server path's input_ids / labels layout rebuilt from
        # the base trainer's prompt / completion keys, the student forward, the teacher's log-probabilities.
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        completion_labels = torch.where(completion_mask.bool(), completion_ids, -100)
        inputs = {
            **inputs,
            "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
            "labels": torch.cat([torch.full_like(prompt_ids, -100), completion_labels], dim=1),
            "prompt_attention_mask": prompt_mask,
        }
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        prompt_length = self._compute_prompt_length(inputs)
        teacher_result = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
        completion_length = teacher_result["actual_logprobs"].shape[1]
        window = slice(prompt_length, prompt_length + completion_length)
        options = self.kernel_options
        loss = server_sparse_divergence_loss(
            student_outputs.logits[:, prompt_length - 1 : -1][:, :completion_length],  # a view: no copy, no log-softmax
            teacher_result, inputs["input_ids"][:, window], inputs["labels"][:, window], beta=self.beta,
            add_tail=self.loss_add_tail, temperature=self.temperature, divergence=options.divergence,
            skew=options.skew, backend=options.backend,
        )
        # TRL 1.16: its base trainer sets loss_is_scaled_for_ga, and this path's local mean divides by the steps itself.
        if self.model.training:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, student_outputs) if return_outputs else loss
