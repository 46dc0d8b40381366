"""The MiniLLM objective pieces against direct, slow implementations of their formulas (float64)."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import minillm_kernels as mk
from conftest import random_logits, start_processes

F64 = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-12)
BATCH, STEPS = 6, 9


def response_masks(batch: int = BATCH, steps: int = STEPS) -> torch.Tensor:
    """Rows of different shapes: full, ending early, length 1, empty, and prompt + response + padding."""
    mask = torch.zeros(batch, steps, dtype=torch.bool)
    mask[0] = True  # full length
    mask[1, :5] = True  # ends early
    mask[2, :1] = True  # a length-1 response
    # row 3 is empty: no valid token
    mask[4, 3:7] = True  # prompt masked before, padding after
    mask[5, :steps - 1] = True
    return mask


def slow_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{t' >= t valid} gamma^(t'-t) r_t' / #{t' >= t valid}, by explicit loops."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        for t in range(rewards.shape[1]):
            if not mask[b, t]:
                continue
            later = [u for u in range(t, rewards.shape[1]) if mask[b, u]]
            out[b, t] = sum(gamma ** (u - t) * rewards[b, u] for u in later) / len(later)
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.0])
def test_length_normalized_returns_match_the_formula(gamma):
    rewards = torch.randn(BATCH, STEPS, dtype=F64)
    mask = response_masks()
    returns = mk.length_normalized_returns(rewards, mask, gamma=gamma)
    torch.testing.assert_close(returns, slow_returns(rewards, mask, gamma), **EXACT)
    assert returns[2, 0] == rewards[2, 0]  # a length-1 response returns its own reward
    assert (returns[~mask] == 0).all()


def test_length_normalized_returns_ignore_masked_rewards_and_default_to_reference_gamma():
    rewards = torch.randn(BATCH, STEPS, dtype=F64)
    mask = response_masks()
    garbage = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    torch.testing.assert_close(mk.length_normalized_returns(garbage, mask), slow_returns(rewards, mask, 0.95), **EXACT)


@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_length_normalized_returns_gradient(gamma):
    """dR_t / dr_t' = gamma^(t'-t) / #{valid from t on} for valid t <= t', else 0."""
    rewards = torch.randn(BATCH, STEPS, dtype=F64, requires_grad=True)
    mask = response_masks()
    upstream = torch.randn(BATCH, STEPS, dtype=F64)
    (mk.length_normalized_returns(rewards, mask, gamma=gamma) * upstream).sum().backward()
    expected = torch.zeros(BATCH, STEPS, dtype=F64)
    for b in range(BATCH):
        for u in range(STEPS):
            if not mask[b, u]:
                continue
            for t in range(u + 1):
                if mask[b, t]:
                    remaining = int(mask[b, t:].sum())
                    expected[b, u] += upstream[b, t] * gamma ** (u - t) / remaining
    torch.testing.assert_close(rewards.grad, expected, **EXACT)


def test_log_ratio_rewards_scale_clip_and_mask():
    log_ratio = torch.randn(BATCH, STEPS, dtype=F64) * 80  # some exceed the clip after scaling
    mask = response_masks()
    rewards = mk.log_ratio_rewards(log_ratio, mask)  # reference defaults: / 0.5, clip +-100
    expected = torch.where(mask, (log_ratio / 0.5).clamp(-100, 100), 0.0)
    torch.testing.assert_close(rewards, expected, **EXACT)
    assert bool((rewards.abs() == 100).any()) and bool(((rewards.abs() < 100) & mask).any())
    plain = mk.log_ratio_rewards(log_ratio, mask, reward_scaling=None, reward_clip=None)  # the paper's
    torch.testing.assert_close(plain, torch.where(mask, log_ratio, 0.0), **EXACT)
    assert not mk.log_ratio_rewards(log_ratio.requires_grad_(), mask).requires_grad


def slow_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    values = [float(v) for v in x[mask]]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return torch.where(mask, (x - mean) / math.sqrt(var + eps), 0.0)


def test_whiten_advantages_over_valid_tokens():
    advantages = torch.randn(BATCH, STEPS, dtype=F64) * 3 + 2
    mask = response_masks()
    whitened = mk.whiten_advantages(advantages, mask)
    torch.testing.assert_close(whitened, slow_whiten(advantages, mask), **EXACT)
    assert abs(float(whitened[mask].mean())) < 1e-12
    assert abs(float(whitened[mask].pow(2).mean()) - 1) < 1e-6


def reference_whiten(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """microsoft/LMOps ``minillm/utils.py whiten`` on the padded tensor (0 where masked), as ours returns it: 0 there.
    One process: ``torch.var_mean`` (unbiased); across processes the population variance of all positions."""
    padded = torch.where(mask, x, 0.0)
    var, mean = torch.var_mean(padded, correction=1 if unbiased else 0)
    return torch.where(mask, (padded - mean) * torch.rsqrt(var + eps), 0.0)


def test_whiten_advantages_over_the_padded_tensor_as_the_reference_code():
    """over="padded": the reference's statistics (every position, padding as 0, unbiased variance): its advantages are
    larger and shifted against ours on a batch of responses of different lengths."""
    advantages = torch.randn(BATCH, STEPS, dtype=F64) * 0.5 + 1
    mask = response_masks()
    padded = mk.whiten_advantages(advantages, mask, over="padded")
    torch.testing.assert_close(padded, reference_whiten(advantages, mask), **EXACT)
    assert not torch.allclose(padded, reference_whiten(advantages, mask, unbiased=False))  # (count - 1) counts
    ours = mk.whiten_advantages(advantages, mask)
    assert float((padded - ours)[mask].abs().max()) > 0.1
    with pytest.raises(ValueError, match=r"over must be one of \('valid', 'padded'\), got 'all'"):
        mk.whiten_advantages(advantages, mask, over="all")


def _whiten_on_rank(rank: int, world: int, folder: str, shards, masks) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        whitened = [mk.whiten_advantages(shards[rank], masks[rank], over=over) for over in ("valid", "padded")]
        torch.save(whitened, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whiten_advantages_across_processes():
    """Two gloo processes whitening their own shard give the whitening of the concatenated batch (over="padded": with
    the population variance, as the reference code's global statistics)."""
    shards = [torch.randn(3, STEPS, dtype=F64) * 2 + 1, torch.randn(3, STEPS, dtype=F64) - 4]
    masks = [response_masks()[:3], response_masks()[3:]]
    with tempfile.TemporaryDirectory() as folder:
        start_processes(_whiten_on_rank, (2, folder, shards, masks), 2, join=True)
        per_rank = [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(2)]
    expected = slow_whiten(torch.cat(shards), torch.cat(masks))
    torch.testing.assert_close(torch.cat([valid for valid, _ in per_rank]), expected, **EXACT)
    local = torch.cat([slow_whiten(s, m) for s, m in zip(shards, masks)])
    assert not torch.allclose(local, expected)  # the shards differ: per-process whitening would be wrong
    torch.testing.assert_close(torch.cat([padded for _, padded in per_rank]),
                               reference_whiten(torch.cat(shards), torch.cat(masks), unbiased=False), **EXACT)


def ppo_inputs(with_weight: bool = True):
    mask = response_masks()
    logprob = (-torch.rand(BATCH, STEPS, dtype=F64) * 4).requires_grad_()
    old_logprob = logprob.detach() + torch.randn(BATCH, STEPS, dtype=F64) * 0.3  # ratios inside and outside the clip
    advantages = torch.randn(BATCH, STEPS, dtype=F64)
    weight = torch.rand(BATCH, STEPS, dtype=F64) * 0.6 + 0.7 if with_weight else None
    # Both branches of the clip on every draw: one token clipped for sure (rho = e w >= 1.9, A > 0: gradient 0), one
    # unclipped for sure (rho = 1); a draw may otherwise clip none (MINILLM_TEST_SEED=682810543, clip 0.2, no weight).
    (b0, t0), (b1, t1) = mask.nonzero().tolist()[:2]
    old_logprob[b0, t0], advantages[b0, t0] = logprob[b0, t0].detach() - 1.0, 1.0
    old_logprob[b1, t1] = logprob[b1, t1].detach() + (0.0 if weight is None else float(weight[b1, t1].log()))
    return logprob, old_logprob, advantages, mask, weight


def slow_ppo(logprob, old_logprob, advantages, mask, weight, clip):
    """-(1/n) sum_valid min(rho A, clip(rho) A) and its gradient in logprob, token by token."""
    count = int(mask.sum())
    logprob = logprob.detach()
    loss, grad = 0.0, torch.zeros_like(advantages)
    for b, t in mask.nonzero().tolist():
        w = 1.0 if weight is None else float(weight[b, t])
        rho = math.exp(float(logprob[b, t]) - float(old_logprob[b, t])) * w
        a = float(advantages[b, t])
        clipped = min(max(rho, 1 - clip), 1 + clip)
        loss -= min(rho * a, clipped * a) / count
        if rho * a <= clipped * a:  # the unclipped branch is the minimum: d(rho A)/dlogprob = rho A
            grad[b, t] = -rho * a / count
    return loss, grad


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_ppo_policy_loss_matches_the_formula_and_its_gradient(with_weight, clip):
    logprob, old_logprob, advantages, mask, weight = ppo_inputs(with_weight)
    loss = mk.ppo_policy_loss(logprob, old_logprob, advantages, mask, importance_weight=weight, clip=clip)
    loss.backward()
    expected_loss, expected_grad = slow_ppo(logprob, old_logprob, advantages, mask, weight, clip)
    assert abs(loss.item() - expected_loss) < 1e-12
    torch.testing.assert_close(logprob.grad, expected_grad, **EXACT)
    clipped = (logprob.grad == 0) & mask
    assert clipped.any() and (~clipped & mask).any()  # both branches were exercised


def test_ppo_policy_loss_without_a_clip_is_the_importance_sampling_loss():
    """clip=None: -mean rho_t A_t, the ratio never clipped (on-policy distillation's loss, the Tinker cookbook's)."""
    logprob, old_logprob, advantages, mask, weight = ppo_inputs()
    loss = mk.ppo_policy_loss(logprob, old_logprob, advantages, mask, importance_weight=weight, clip=None)
    loss.backward()
    expected_loss, expected_grad = slow_ppo(logprob, old_logprob, advantages, mask, weight, math.inf)
    assert abs(loss.item() - expected_loss) < 1e-12
    torch.testing.assert_close(logprob.grad, expected_grad, **EXACT)
    assert (logprob.grad[mask] != 0).all()  # (with a clip, some ratios of these inputs are clipped: gradient 0)


def test_ppo_policy_loss_default_clip_is_reference_and_empty_mask_gives_zero():
    logprob, old_logprob, advantages, mask, weight = ppo_inputs()
    default = mk.ppo_policy_loss(logprob, old_logprob, advantages, mask, importance_weight=weight)
    assert abs(default.item() - slow_ppo(logprob, old_logprob, advantages, mask, weight, 0.2)[0]) < 1e-12
    empty = torch.zeros_like(mask)
    loss = mk.ppo_policy_loss(logprob, old_logprob, advantages, empty)
    loss.backward()
    assert loss.item() == 0 and (logprob.grad == 0).all()


def test_single_step_and_language_modeling_losses():
    mask = response_masks()
    kl = torch.rand(BATCH, STEPS, dtype=F64, requires_grad=True)
    weight = torch.rand(BATCH, STEPS, dtype=F64) + 0.5
    count = int(mask.sum())
    loss = mk.single_step_loss(kl, mask, importance_weight=weight)
    loss.backward()
    expected = sum(float(weight[b, t] * kl.detach()[b, t]) for b, t in mask.nonzero().tolist()) / count
    assert abs(loss.item() - expected) < 1e-12
    torch.testing.assert_close(kl.grad, torch.where(mask, weight / count, 0.0), **EXACT)
    unweighted = mk.single_step_loss(kl, mask)  # the reference code's form
    assert abs(unweighted.item() - float(kl.detach()[mask].mean())) < 1e-12

    logprob = (-torch.rand(BATCH, STEPS, dtype=F64) * 5).requires_grad_()
    lm = mk.language_modeling_loss(logprob, mask)
    lm.backward()
    assert abs(lm.item() + sum(float(logprob.detach()[b, t]) for b, t in mask.nonzero().tolist()) / count) < 1e-12
    torch.testing.assert_close(logprob.grad, torch.where(mask, torch.tensor(-1.0 / count, dtype=F64), 0.0), **EXACT)


def naive_minillm_loss(student_logits, teacher_logits, ids, mask, old_logprob, rewards, weight, lm_logprob, lm_mask,
                       gamma, clip, lm_coef):
    """The whole objective written out from full-vocabulary tensors and the slow helpers above."""
    log_q = torch.log_softmax(student_logits, -1)
    log_p = torch.log_softmax(teacher_logits, -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    logprob = log_q.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    advantages = slow_whiten(slow_returns(rewards, mask, gamma), mask)
    count = int(mask.sum())
    ratio = (logprob - old_logprob).exp() * weight
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    pg = -(surrogate * mask).sum() / count
    single = (weight * kl * mask).sum() / count
    lm = -(lm_logprob * lm_mask).sum() / int(lm_mask.sum())
    return pg + single + lm_coef * lm, dict(pg_loss=pg, single_step_loss=single, lm_loss=lm)


def test_minillm_loss_combines_the_parts_with_their_gradients():
    vocab = 11
    mask = response_masks()
    student_logits = random_logits(BATCH * STEPS, vocab, F64, "cpu").reshape(BATCH, STEPS, vocab).requires_grad_()
    teacher_logits = random_logits(BATCH * STEPS, vocab, F64, "cpu").reshape(BATCH, STEPS, vocab)
    ids = torch.randint(0, vocab, (BATCH, STEPS))
    with torch.no_grad():
        current = torch.log_softmax(student_logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old_logprob = current + torch.randn(BATCH, STEPS, dtype=F64) * 0.2
    rewards = torch.randn(BATCH, STEPS, dtype=F64)
    weight = torch.rand(BATCH, STEPS, dtype=F64) + 0.5
    lm_logprob = (-torch.rand(3, 5, dtype=F64) * 4).requires_grad_()
    lm_mask = torch.rand(3, 5) < 0.8
    lm_mask[0, 0] = True

    stats = mk.fused_token_stats(student_logits, teacher_logits, ids, mask=mask, backend="reference")
    total, parts = mk.minillm_loss(stats, old_logprob, rewards, weight, mask, lm_logprob=lm_logprob, lm_mask=lm_mask,
                                   lm_coef=0.7)
    total.backward()
    grads = student_logits.grad.clone(), lm_logprob.grad.clone()
    student_logits.grad = lm_logprob.grad = None
    expected_total, expected_parts = naive_minillm_loss(
        student_logits, teacher_logits, ids, mask, old_logprob, rewards, weight, lm_logprob, lm_mask, 0.95, 0.2, 0.7
    )
    expected_total.backward()
    assert abs(total.item() - expected_total.item()) < 1e-10
    for name, value in expected_parts.items():
        assert abs(float(parts[name]) - value.item()) < 1e-10, name
    torch.testing.assert_close(grads[0], student_logits.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1], lm_logprob.grad, **EXACT)
    assert float(parts["total_loss"]) == total.item() and not any(v.requires_grad for v in parts.values())
    assert abs(float(parts["reward"]) - float(rewards[mask].mean())) < 1e-12
    assert 0 < float(parts["clip_fraction"]) < 1


def test_minillm_loss_without_lm_or_whitening():
    mask = response_masks()
    stats = mk.TokenStats(
        reverse_kld=torch.rand(BATCH, STEPS, dtype=F64, requires_grad=True),
        student_logprob=(-torch.rand(BATCH, STEPS, dtype=F64)).requires_grad_(),
        teacher_logprob=torch.zeros(BATCH, STEPS, dtype=F64),
        log_ratio=torch.zeros(BATCH, STEPS, dtype=F64),
        importance_weight=torch.ones(BATCH, STEPS, dtype=F64),
        entropy=None,
    )
    old_logprob = stats.student_logprob.detach() + 0.1 * torch.randn(BATCH, STEPS, dtype=F64)
    rewards, weight = torch.randn(BATCH, STEPS, dtype=F64), torch.rand(BATCH, STEPS, dtype=F64) + 0.5
    total, parts = mk.minillm_loss(stats, old_logprob, rewards, weight, mask, whiten=False, gamma=1.0,
                                   single_step_coef=0.5)
    advantages = mk.length_normalized_returns(rewards, mask, gamma=1.0)
    pg = mk.ppo_policy_loss(stats.student_logprob, old_logprob, advantages, mask, importance_weight=weight)
    single = mk.single_step_loss(stats.reverse_kld, mask, importance_weight=weight)
    assert abs(total.item() - (pg + 0.5 * single).item()) < 1e-12 and "lm_loss" not in parts


def test_minillm_loss_with_the_reference_code_switches():
    """whiten_over="padded" whitens as the reference code; weighted_single_step=False is its unweighted mean of KL_t."""
    mask = response_masks()
    stats = stats_of(torch.rand(BATCH, STEPS, dtype=F64, requires_grad=True))
    old_logprob = stats.student_logprob.detach() + 0.1 * torch.randn(BATCH, STEPS, dtype=F64)
    rewards, weight = torch.randn(BATCH, STEPS, dtype=F64), torch.rand(BATCH, STEPS, dtype=F64) + 0.5
    total, parts = mk.minillm_loss(stats, old_logprob, rewards, weight, mask, whiten_over="padded",
                                   weighted_single_step=False)
    advantages = reference_whiten(mk.length_normalized_returns(rewards, mask), mask)
    pg = mk.ppo_policy_loss(stats.student_logprob, old_logprob, advantages, mask, importance_weight=weight)
    single = float(stats.reverse_kld.detach()[mask].mean())
    assert abs(float(parts["pg_loss"]) - pg.item()) < 1e-12 and abs(float(parts["single_step_loss"]) - single) < 1e-12
    weighted = mk.minillm_loss(stats, old_logprob, rewards, weight, mask)[1]["single_step_loss"]
    paper = mk.single_step_loss(stats.reverse_kld, mask, importance_weight=weight)  # the default: the w-weighted mean
    assert abs(float(weighted) - paper.item()) < 1e-12 and abs(paper.item() - single) > 1e-12


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m, x: mk.length_normalized_returns(x, m, gamma=1.5), ValueError, "gamma"),
        (lambda m, x: mk.length_normalized_returns(x, m.float()), TypeError, "mask"),
        (lambda m, x: mk.length_normalized_returns(x[:, :-1], m), ValueError, "rewards"),
        (lambda m, x: mk.ppo_policy_loss(x, x, x, m, clip=-0.1), ValueError, "clip"),
        (lambda m, x: mk.ppo_policy_loss(x, x, x.long(), m), TypeError, "advantages"),
        (lambda m, x: mk.log_ratio_rewards(x, m, reward_scaling=0), ValueError, "reward_scaling"),
        (lambda m, x: mk.single_step_loss(x, m, importance_weight=x[:1]), ValueError, "importance_weight"),
        (lambda m, x: mk.minillm_loss(x, x, x, x, m), TypeError, "token_stats"),
        (lambda m, x: mk.minillm_loss(stats_of(x), x, x, x, m, lm_coef=math.nan), ValueError, "lm_coef"),
        (lambda m, x: mk.minillm_loss(stats_of(x), x, x, x, m, single_step_coef="1"), TypeError,
         "single_step_coef must be a number, got str"),
        (lambda m, x: mk.minillm_loss(stats_of(x), x, x, x, m, clip=None), TypeError, "clip must be a number"),
        (lambda m, x: mk.minillm_loss(stats_of(x), x, x, x, m, gamma=math.nan), ValueError, "gamma"),
        (lambda m, x: mk.minillm_loss(stats_of(x), x, x, x, m, whiten="yes"), TypeError, "whiten must be True or"),
        (lambda m, x: mk.minillm_loss(stats_of(x), x, x, x, m, weighted_single_step=1), TypeError,
         "weighted_single_step must be True or False"),
        (lambda m, x: mk.minillm_loss(stats_of(x), x, x, x, m, whiten_over="tokens"), ValueError, "over must be one"),
        (lambda m, x: mk.log_ratio_rewards(x, m, reward_clip=math.inf), ValueError, "reward_clip .* finite"),
    ],
)
def test_bad_arguments_are_named(call, error, words):
    with pytest.raises(error, match=words):
        call(response_masks(), torch.randn(BATCH, STEPS, dtype=F64))


def stats_of(x: torch.Tensor) -> mk.TokenStats:
    """TokenStats whose per-token fields are all ``x``."""
    return mk.TokenStats(x, x, x, x, x, None)


def test_zero_length_responses():
    """A [B, 0] batch (every response empty) gives empty returns and a zero loss, not an IndexError."""
    mask = torch.zeros(3, 0, dtype=torch.bool)
    empty = torch.zeros(3, 0, dtype=F64)
    assert mk.length_normalized_returns(empty, mask).shape == (3, 0)
    total, parts = mk.minillm_loss(stats_of(empty), empty, empty, empty, mask)
    assert total.item() == 0.0 and parts["pg_loss"].item() == 0.0
