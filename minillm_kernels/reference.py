"""The naive PyTorch formulas: the oracle every backend is tested against.

Everything here is written the way a user would write it by hand, on full ``[N, V]`` tensors, with
autograd providing the gradients. It runs in any float dtype (float64 included) on any device, and is
also the ``"reference"`` backend. Shapes: ``student``/``teacher`` are ``[N, V_s]``/``[N, V_t]``,
``target``/``mask`` are ``[N]``; the first ``vocab_size`` columns are the real vocabulary.
"""
from __future__ import annotations

import torch


def _log_softmax(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log softmax(logits[:, :vocab_size] / T), computed in at least float32."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits[:, :vocab_size].to(compute_dtype) / temperature, dim=-1)


def token_stats(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (KL(q || p), log q(y), log p(y), H(q)), each ``[N]``, 0 where ``mask`` is False.

    log q = log_softmax(s / T), log p = log_softmax(t / T) over the first ``vocab_size`` columns;
    KL = sum_v q_v (log q_v - log p_v), H = -sum_v q_v log q_v, terms with q_v = 0 count 0.
    Without ``target`` the two log-probabilities are zeros. The teacher gets no gradient.
    """
    student_logq = _log_softmax(student, vocab_size, temperature)
    teacher_logp = _log_softmax(teacher.detach(), vocab_size, temperature)
    q = student_logq.exp()
    zero = student_logq.new_zeros(())
    # Select before multiplying, so that the dead terms' gradients are 0 and not 0 * inf = NaN.
    live = q > 0
    kl = (q * torch.where(live, student_logq - teacher_logp, zero)).sum(-1)
    entropy = -(q * torch.where(live, student_logq, zero)).sum(-1)
    if target is None:
        student_logprob = teacher_logprob = torch.zeros_like(kl)
    else:
        index = target.clamp(0, vocab_size - 1).unsqueeze(-1)  # masked rows may hold ignore ids
        student_logprob = student_logq.gather(-1, index).squeeze(-1)
        teacher_logprob = teacher_logp.gather(-1, index).squeeze(-1)
    stats = (kl, student_logprob, teacher_logprob, entropy)
    if mask is not None:
        stats = tuple(torch.where(mask, x, zero) for x in stats)
    return stats
