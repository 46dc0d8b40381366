"""The MiniLLM training objective, assembled from per-token ``[batch, seq]`` tensors.

Nothing here touches a ``[..., V]`` tensor: the vocabulary-wide terms (KL_t, log q(y_t), ...) come from
``fused_token_stats`` (or, for rollouts, from ``sample_teacher_mixed``); these functions only weight,
accumulate and average them. Every function takes a bool ``mask`` (True = the token counts) of the
tensors' shape, and gives masked positions 0 and no gradient.

One MiniLLM step on a rollout batch (y ~ p~ = alpha p + (1 - alpha) q_old, see ``sampling.py``):

    rewards    = log_ratio_rewards(teacher_logprob - old_logprob, mask)         # once per rollout
    stats      = fused_token_stats(student_logits, teacher_logits, response_ids, mask=mask)
    loss, logs = minillm_loss(stats, old_logprob, rewards, importance_weight, mask,
                              lm_logprob=pretrain_logprob, lm_mask=pretrain_mask)

with L = L_pg + single_step_coef * L_single + lm_coef * L_PT:
    L_pg     = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),  rho_t = q(y_t) / q_old(y_t) * w_t,
               A_t = whiten(R_t),  R_t = sum_{t' >= t} gamma^(t'-t) r_{t'} / (valid tokens from t on),
    L_single = mean_t w_t KL_t,
    L_PT     = -mean_t log q(x_t)  on pre-training text.

Defaults and their sources: the paper is Gu et al., "MiniLLM: Knowledge Distillation of Large Language
Models" (ICLR 2024); the reference code is microsoft/LMOps ``minillm/`` (``minillm/losses.py``,
``minillm/sampler.py``, ``minillm/utils.py``, ``scripts/*/minillm/train_*.sh``). Where they differ:

=============================  ==============================  ==============================  =========
quantity                       paper                           reference code                  default
=============================  ==============================  ==============================  =========
reward r_t                     log p(y_t) - log q(y_t)         same, divided by 0.5 and        code
                                                               clipped to +-100 (train
                                                               scripts)
reward temperature             (T = 1)                         log p at T = 1, log q at the    both at T
                                                               sampling T                      (same at 1)
long-term return               R_{t+1}: from the next token    R_t: from the current token     code
                               on (r_t is the single-step      on, so r_t counts in both
                               part's)                         terms
discount                       none (gamma = 1)                gamma = 0.95                    code
length normalisation           1 / (tokens after t)            1 / (valid tokens from t on)    code
advantage whitening            not mentioned                   whitened per mini-batch         code, over
                                                               (padding included, unbiased     valid
                                                               variance: ``over="padded"``)    tokens
single-step term               w_t-weighted: sum_t w_t KL_t    unweighted mean_t KL_t          paper's
                                                               (``weighted_single_step=        w_t, mean
                                                               False``)                        over tokens
PPO clip                       clipping with 0.2               clip(rho * w, 0.8, 1.2)         code
teacher-mixed sampling         alpha p + (1 - alpha) q         mixes each model's T/top-k/     see
                                                               top-p-warped distribution       sampling.py
LM loss on pre-training text   cross-entropy, coefficient 1    0.5 CE + 0.5 teacher soft-CE    paper
                                                               (--kd-ratio 0.5), coef. 1
=============================  ==============================  ==============================  =========
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from minillm_kernels.losses import TokenStats
from minillm_kernels.validation import as_real

# One place for each default; the table above gives its source.
REWARD_SCALING = 0.5  # rewards are divided by it (reference scripts: --reward-scaling 0.5)
REWARD_CLIP = 100.0  # then clipped to [-REWARD_CLIP, REWARD_CLIP] (reference scripts: --cliprange-reward 100)
GAMMA = 0.95  # discount of the future rewards (reference: --gamma 0.95)
PPO_CLIP = 0.2  # PPO clip range on rho (paper and reference: --cliprange 0.2)
WHITEN_EPS = 1e-8  # (A - mean) / sqrt(var + eps) (reference)
WHITEN_OVER = ("valid", "padded")  # what whiten_advantages takes the statistics over: ours, the reference code's
SINGLE_STEP_COEF = 1.0  # weight of L_single (paper and reference: added with weight 1)
LM_COEF = 1.0  # weight of L_PT (paper and reference: --lm-coef 1)


def _check_mask(mask: object) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = the token counts), got {mask.dtype}")
    return mask


def _check_per_token(name: str, x: object, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape != mask.shape:
        raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, got {tuple(x.shape)}")
    if x.device != mask.device:
        raise ValueError(f"{name} is on {x.device} but the mask is on {mask.device}")
    return x


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over valid tokens / their count; 0, with zero gradient, when none is valid."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def log_ratio_rewards(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    reward_scaling: Optional[float] = REWARD_SCALING,
    reward_clip: Optional[float] = REWARD_CLIP,
) -> torch.Tensor:
    """MiniLLM's per-token reward r_t = clip((log p(y_t) - log q(y_t)) / reward_scaling, -c, c), detached.

    ``log_ratio`` is ``TokenStats.log_ratio`` or ``teacher_logprob - student_logprob`` from the
    sampler, ``[B, T]``. The defaults are the reference code's (divide by 0.5, clip to +-100); the
    paper uses the plain log-ratio (``reward_scaling=None, reward_clip=None``). With whitened
    advantages the scaling cancels out and only the clip matters.

    Returns: ``[B, T]``, 0 where masked, detached.
    """
    mask = _check_mask(mask)
    log_ratio = _check_per_token("log_ratio", log_ratio, mask)
    rewards = log_ratio.detach()
    if reward_scaling is not None:
        rewards = rewards / as_real("reward_scaling (or None)", reward_scaling, 0.0, open_low=True)
    if reward_clip is not None:
        clip = as_real("reward_clip (or None)", reward_clip, 0.0)
        rewards = rewards.clamp(-clip, clip)
    return torch.where(mask, rewards, 0.0)


def length_normalized_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """Length-normalised discounted future reward, MiniLLM's advantage before whitening.

        R_t = sum_{t' >= t, valid} gamma^(t' - t) r_{t'} / #{t' >= t : valid},   0 where masked.

    The exponent counts positions, so a mask may cover a prompt and padding as well as end rows
    early. This is the reference code's form (R_t includes r_t; gamma = 0.95); the paper's is
    undiscounted and starts at t + 1 (see the module docstring).

    Args:
        rewards: ``[B, T]`` float per-token rewards (masked positions are ignored).
        mask: ``[B, T]`` bool.
        gamma: discount in [0, 1].

    Returns: ``[B, T]``, differentiable in ``rewards``.
    """
    mask = _check_mask(mask)
    rewards = _check_per_token("rewards", rewards, mask)
    gamma = as_real("gamma", gamma, 0.0, 1.0)
    if rewards.dim() == 0:
        raise ValueError("rewards must have shape [..., T], got a scalar")
    if rewards.shape[-1] == 0:  # zero-length responses: nothing to return
        return torch.zeros_like(rewards)
    rewards = torch.where(mask, rewards, 0.0)
    running = torch.zeros_like(rewards[..., 0])
    discounted = []
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        discounted.append(running)
    discounted = torch.stack(discounted[::-1], dim=-1)
    remaining = mask.flip(-1).cumsum(-1).flip(-1)  # valid tokens from t on
    return torch.where(mask, discounted / remaining.clamp(min=1), 0.0)


def whiten_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, *, eps: float = WHITEN_EPS, distributed: bool = True,
    over: str = "valid",
) -> torch.Tensor:
    """(A - mean) / sqrt(var + eps), 0 where masked, detached.

    ``over="valid"`` (the default): mean and var (the population variance, dividing by the count) are taken over
    every valid token of the batch. ``over="padded"`` (the reference code's ``whiten``): over every position of the
    ``[B, T]`` tensor, a masked one counting as A = 0 (the reference's returns are 0 there), with the unbiased
    variance (dividing by count - 1, ``torch.var_mean``'s) on one process and the population variance across
    processes (the reference's ``get_global_statistics``). The statistics pool every process's batch when
    ``torch.distributed`` is initialised and ``distributed`` is True (two all-reduces; every process must call it).
    """
    mask = _check_mask(mask)
    advantages = _check_per_token("advantages", advantages, mask).detach()
    as_real("eps", eps, 0.0)
    if over not in WHITEN_OVER:
        raise ValueError(f"over must be one of {WHITEN_OVER}, got {over!r}")
    across_processes = distributed and dist.is_available() and dist.is_initialized()
    counted = mask if over == "valid" else torch.ones_like(mask)
    values = torch.where(mask, advantages.to(torch.promote_types(advantages.dtype, torch.float32)), 0.0)
    sum_and_count = torch.stack([values.sum(), counted.sum().to(values.dtype)])
    if across_processes:
        dist.all_reduce(sum_and_count)
    count = sum_and_count[1].clamp(min=1)
    mean = sum_and_count[0] / count
    squared_deviation = torch.where(counted, (values - mean) ** 2, 0.0).sum()
    if across_processes:
        dist.all_reduce(squared_deviation)
    unbiased = over == "padded" and not across_processes
    variance = squared_deviation / ((count - 1).clamp(min=1) if unbiased else count)
    return torch.where(mask, (values - mean) * torch.rsqrt(variance + eps), 0.0).to(advantages.dtype)


def _policy_ratio(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    mask: torch.Tensor,
    importance_weight: Optional[torch.Tensor],
) -> torch.Tensor:
    """rho_t = exp(log q(y_t) - log q_old(y_t)) * w_t, 1 * w_t where masked (no inf * 0 there)."""
    log_ratio = torch.where(mask, logprob - old_logprob.detach(), 0.0)
    ratio = log_ratio.exp()
    if importance_weight is not None:
        ratio = ratio * importance_weight.detach()
    return ratio


def ppo_policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    importance_weight: Optional[torch.Tensor] = None,
    clip: Optional[float] = PPO_CLIP,
) -> torch.Tensor:
    """PPO's clipped surrogate on the importance-weighted ratio, MiniLLM's long-term part L_pg.

        rho_t = exp(log q(y_t) - log q_old(y_t)) * w_t
        L_pg  = -mean_{valid t} min(rho_t A_t, clip(rho_t, 1 - clip, 1 + clip) A_t)
        (clip=None: -mean_{valid t} rho_t A_t, the unclipped importance-sampling policy-gradient loss)

    The mean runs over every valid token of the batch (as the reference code does). Gradients flow
    to ``logprob`` only: ``old_logprob``, ``advantages`` and ``importance_weight`` are constants.

    Args:
        logprob: ``[B, T]`` log q_theta(y_t) of the current student (e.g. ``TokenStats.student_logprob``).
        old_logprob: ``[B, T]`` log q_old(y_t) of the student that sampled (at the same temperature).
        advantages: ``[B, T]`` A_t (e.g. whitened ``length_normalized_returns``).
        mask: ``[B, T]`` bool.
        importance_weight: optional ``[B, T]`` w_t = q_old(y_t) / p~(y_t) (None: w = 1).
        clip: the clip range, >= 0 (0.2 in the paper and reference code), or None: no clipping (the Tinker
            cookbook's ``importance_sampling`` loss, which on-policy distillation uses).

    Returns: a 0-dim tensor; 0 (zero gradient) if no token is valid.
    """
    mask = _check_mask(mask)
    for name, x in (("logprob", logprob), ("old_logprob", old_logprob), ("advantages", advantages)):
        _check_per_token(name, x, mask)
    if importance_weight is not None:
        _check_per_token("importance_weight", importance_weight, mask)
    ratio = _policy_ratio(logprob, old_logprob, mask, importance_weight)
    advantages = advantages.detach()
    if clip is None:
        return -_masked_mean(ratio * advantages, mask)
    clip = as_real("clip (or None)", clip, 0.0)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    return -_masked_mean(surrogate, mask)


def single_step_loss(
    reverse_kld: torch.Tensor, mask: torch.Tensor, *, importance_weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """MiniLLM's single-step part L_single = mean_{valid t} w_t KL_t (exact over the vocabulary).

    ``reverse_kld`` is ``TokenStats.reverse_kld`` (the gradient flows through it to the student
    logits); ``importance_weight`` w_t is a constant (None: w = 1, which is the reference code's
    unweighted form; the paper weights by w_t). Shapes ``[B, T]``; returns a 0-dim tensor.
    """
    mask = _check_mask(mask)
    _check_per_token("reverse_kld", reverse_kld, mask)
    if importance_weight is None:
        return _masked_mean(reverse_kld, mask)
    _check_per_token("importance_weight", importance_weight, mask)
    return _masked_mean(importance_weight.detach() * reverse_kld, mask)


def language_modeling_loss(logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_PT = -mean_{valid t} log q(x_t): cross-entropy of the student on pre-training text.

    ``logprob`` is the student's ``[B, T]`` log-probability of each next token, e.g.
    ``-torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")``
    reshaped, or a fused kernel's ``student_logprob``. Returns a 0-dim tensor.
    """
    mask = _check_mask(mask)
    _check_per_token("logprob", logprob, mask)
    return -_masked_mean(logprob, mask)


def minillm_loss(
    token_stats: TokenStats,
    old_logprob: torch.Tensor,
    rewards: torch.Tensor,
    importance_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    lm_logprob: Optional[torch.Tensor] = None,
    lm_mask: Optional[torch.Tensor] = None,
    gamma: float = GAMMA,
    whiten: bool = True,
    whiten_over: str = "valid",
    clip: float = PPO_CLIP,
    single_step_coef: float = SINGLE_STEP_COEF,
    weighted_single_step: bool = True,
    lm_coef: float = LM_COEF,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MiniLLM loss on one mini-batch of rollouts: L = L_pg + single_step_coef L_single + lm_coef L_PT.

        A_t      = whiten(length_normalized_returns(rewards, mask, gamma), over=whiten_over)   (if ``whiten``)
        L_pg     = ppo_policy_loss(student_logprob, old_logprob, A, mask, importance_weight=w, clip=clip)
        L_single = mean_t w_t KL_t  (the paper's), or mean_t KL_t with ``weighted_single_step=False`` (the reference
                   code's)
        L_PT     = -mean_t lm_logprob   (only if ``lm_logprob`` is given)

    Args:
        token_stats: ``fused_token_stats(student_logits, teacher_logits, response_ids, mask=mask,
            temperature=T)`` of the current student on the rollout; its ``student_logprob`` and
            ``reverse_kld`` carry the gradient.
        old_logprob: ``[B, T]`` log q_old(y_t) recorded at sampling (``TeacherMixedSample.student_logprob``),
            at the same temperature T.
        rewards: ``[B, T]`` r_t from ``log_ratio_rewards``, computed once per rollout.
        importance_weight: ``[B, T]`` w_t recorded at sampling (``TeacherMixedSample.importance_weight``).
        mask: ``[B, T]`` bool response mask.
        lm_logprob, lm_mask: ``[B', T']`` student log-probabilities of pre-training text and their mask.
        gamma, whiten, whiten_over, clip, single_step_coef, weighted_single_step, lm_coef: see the module
            docstring for their sources.

    Returns:
        ``(total, parts)``: the 0-dim loss, and detached 0-dim tensors for logging: "pg_loss",
        "single_step_loss", "lm_loss" (if given), "total_loss", "reward" (mean r_t), "reverse_kld"
        (mean KL_t, unweighted), "importance_weight" (mean w_t), "clip_fraction" (share of valid
        tokens whose rho lies outside [1 - clip, 1 + clip]).
    """
    if not isinstance(token_stats, TokenStats):
        raise TypeError(f"token_stats must be the TokenStats of fused_token_stats, got {type(token_stats).__name__}")
    mask = _check_mask(mask)
    for name, x in (
        ("token_stats.student_logprob", token_stats.student_logprob),
        ("token_stats.reverse_kld", token_stats.reverse_kld),
        ("old_logprob", old_logprob),
        ("rewards", rewards),
        ("importance_weight", importance_weight),
    ):
        _check_per_token(name, x, mask)
    if (lm_logprob is None) != (lm_mask is None):
        raise ValueError("lm_logprob and lm_mask must be given together")
    for name, flag in (("whiten", whiten), ("weighted_single_step", weighted_single_step)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
    single_step_coef = as_real("single_step_coef", single_step_coef, 0.0)
    lm_coef = as_real("lm_coef", lm_coef, 0.0)
    clip = as_real("clip", clip, 0.0)  # (MiniLLM's PPO always clips: not ppo_policy_loss's clip=None)
    returns = length_normalized_returns(rewards.detach(), mask, gamma)
    advantages = whiten_advantages(returns, mask, over=whiten_over) if whiten else returns
    pg_loss = ppo_policy_loss(
        token_stats.student_logprob, old_logprob, advantages, mask, importance_weight=importance_weight, clip=clip
    )
    single = single_step_loss(token_stats.reverse_kld, mask,
                              importance_weight=importance_weight if weighted_single_step else None)
    total = pg_loss + single_step_coef * single
    parts = {"pg_loss": pg_loss, "single_step_loss": single}
    if lm_logprob is not None:
        lm_loss = language_modeling_loss(lm_logprob, lm_mask)
        total = total + lm_coef * lm_loss
        parts["lm_loss"] = lm_loss
    with torch.no_grad():
        ratio = _policy_ratio(token_stats.student_logprob, old_logprob, mask, importance_weight)
        parts.update(
            total_loss=total,
            reward=_masked_mean(rewards, mask),
            reverse_kld=_masked_mean(token_stats.reverse_kld, mask),
            importance_weight=_masked_mean(importance_weight, mask),
            clip_fraction=_masked_mean(((ratio - 1.0).abs() > clip).to(ratio.dtype), mask),
        )
    return total, {name: value.detach() for name, value in parts.items()}
