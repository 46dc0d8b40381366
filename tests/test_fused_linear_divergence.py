"""fused_linear_divergence against the unfused composition: the lm_head matmuls in float64 on the CPU, then the
reference divergence on the full logits; values and the gradients of the student's hidden states, weight and bias
(masks, biases, padded vocabularies, reductions, chunk sizes, mixed dtypes), and no [N, V] tensor ever."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import minillm_kernels as mk
from conftest import ALL_BACKENDS, device_for, random_mask, require_backend, tolerance
from test_fused_linear import (
    BATCH, RELATIVE_ERROR, SEQ, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB, LargestTensor, as_reference_leaves,
    assert_gradients_close, assert_relative_error, gradients, leaves, projection, unfused_logits,
)

DIVERGENCES = ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
BETA, SKEW = 0.3, 0.2


class CaseInputs(NamedTuple):
    """What a ``divergence_case`` drew: each model's (hidden, weight, bias) as ours got them, the upstream gradient of
    the per-token loss (float64) and the mask."""

    student: tuple
    teacher: tuple
    upstream: torch.Tensor
    mask: torch.Tensor


def divergence_case(backend, divergence, reduction, chunk_size, *, student_dtype=torch.float64,
                    teacher_dtype=torch.float64, bias=True, vocab_size=VOCAB, temperature=1.5):
    """Ours and the unfused reference: (loss, grads) each, with a random upstream gradient; a mask; the teacher's
    weight padded past vocab_size. Returns (ours, reference, inputs)."""
    device = device_for(backend)
    student = leaves(*projection(STUDENT_HIDDEN, vocab_size, student_dtype, device, bias=bias))
    teacher = projection(TEACHER_HIDDEN, vocab_size + 3, teacher_dtype, device, bias=bias)
    mask = random_mask(BATCH * SEQ, device).view(BATCH, SEQ)
    kwargs = dict(divergence=divergence, beta=BETA, skew=SKEW, mask=mask, temperature=temperature,
                  reduction=reduction, vocab_size=vocab_size)
    loss = mk.fused_linear_divergence(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                      teacher_bias=teacher[2], chunk_size=chunk_size, backend=backend, **kwargs)
    upstream = torch.randn(loss.shape, dtype=torch.float64)
    grads = gradients((loss * upstream.to(loss)).sum(), student)

    ref_student, ref_teacher = as_reference_leaves(student, teacher)
    expected = mk.fused_divergence(unfused_logits(*ref_student), unfused_logits(*ref_teacher), backend="reference",
                                   **{**kwargs, "mask": mask.cpu()})
    expected_grads = gradients((expected * upstream).sum(), ref_student)
    return (loss, grads), (expected, expected_grads), CaseInputs(student, teacher, upstream, mask)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_every_divergence_matches_the_unfused_composition(backend, divergence, reduction):
    """float64: chunks of 4 over the ~18 counted tokens, biases, a padded teacher, temperature 1.5."""
    require_backend(backend)
    (loss, grads), (expected, expected_grads), inputs = divergence_case(backend, divergence, reduction, 4)
    mask = inputs.mask
    tol = tolerance(torch.float64)
    assert loss.shape == expected.shape and loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), expected, **tol)
    assert_gradients_close(grads, expected_grads, **tol)
    assert (grads[0][~mask] == 0).all()  # masked tokens: no gradient to their hidden states
    if reduction == "none":
        assert (loss[~mask] == 0).all()


@pytest.mark.parametrize("chunk_size", (None, 1, 7, 1000))
@pytest.mark.parametrize("bias", (True, False))
def test_any_chunk_size_with_or_without_biases(chunk_size, bias):
    require_backend("cpu")
    (loss, grads), (expected, expected_grads), _ = divergence_case("cpu", "jsd", "mean", chunk_size, bias=bias)
    torch.testing.assert_close(loss, expected, **tolerance(torch.float64))
    assert_gradients_close(grads, expected_grads, **tolerance(torch.float64))


def stored_logits(hidden: torch.Tensor, weight: torch.Tensor, bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits h W^T + b as the fused function stores them (``fused_linear._Projection.logits``: a float32 sum
    of the H products and the bias, rounded once to the weight's dtype), [N, V] float64: (exact, stored, spread).
    The float32 sum is within gamma = (H + 1) u_32 (sum_k |h_k w_vk| + |b_v|) of the exact value and rounding is
    monotonic, so the stored logit lies between the roundings of exact - gamma and exact + gamma: ``stored`` is the
    rounding of the exact value, ``spread`` how far those two lie apart (0 where the rounding is determined, one
    ulp in the rare columns within gamma of a rounding boundary)."""
    dtype = weight.dtype
    hidden, weight = (x.detach().cpu().double() for x in (hidden, weight))
    bias = None if bias is None else bias.detach().cpu().double()
    exact = unfused_logits(hidden, weight, bias).reshape(-1, weight.shape[0])
    magnitude = hidden.abs().reshape(-1, hidden.shape[-1]) @ weight.abs().t() + (0 if bias is None else bias.abs())
    gamma = (hidden.shape[-1] + 1) * 2.0**-24 * magnitude

    def stored(x: torch.Tensor) -> torch.Tensor:
        return x.float().to(dtype).double()

    return exact, stored(exact), stored(exact + gamma) - stored(exact - gamma)


def tvd_sign_flips(inputs: CaseInputs, *, temperature: float, vocab_size: int = VOCAB) -> tuple[float, float, float]:
    """Bounds on the norm of what sign flips add to the TVD's gradients of (hidden, weight, bias).

    The TVD's logit gradient is k g (q_v a_v - q_v sum_u q_u a_u) with q_v a_v = 1/2 q_v sign(q_v - p_v). Ours
    computes it from the logits it stored in the weights' dtype (``stored_logits``), the reference from exact ones,
    and rounding a logit can reorder q_v and p_v. The columns where ours may take the other sign: those where the
    stored logits order them otherwise than the exact ones, and those where log q_v - log p_v from the stored logits
    is within what ours may still move it by: its own float32 error, 16 u_32 (1 + |log q_v| + |log p_v|) as in
    test_divergence's bound, and each model's spread s_v + max_u s_u over T where a rounding is not determined (a
    log-softmax moves by the logit's change plus at most the largest change of its log-normaliser). A flip in column
    u moves that column by k |g| q_u and every column v of the row by k |g| q_v q_u through the mean. With A the
    sum of these over the flipped columns ([N, V], q the larger of the exact and the stored one, 0 in masked rows),
    the gradients of the hidden states, the weight and the bias move by at most ||A |W|||, ||A^T |h|||, ||sum_n A||
    (Frobenius norms)."""
    (hidden, weight, bias), (teacher_hidden, teacher_weight, teacher_bias) = inputs.student, inputs.teacher
    (exact_s, stored_s, spread_s), (exact_t, stored_t, spread_t) = (
        stored_logits(h, w[:vocab_size], None if b is None else b[:vocab_size])
        for h, w, b in ((hidden, weight, bias), (teacher_hidden, teacher_weight, teacher_bias)))
    log_q, stored_log_q = ((x / temperature).log_softmax(-1) for x in (exact_s, stored_s))
    log_p, stored_log_p = ((x / temperature).log_softmax(-1) for x in (exact_t, stored_t))
    stored_gap = stored_log_q - stored_log_p
    slack = 16 * 2.0**-24 * (1 + stored_log_q.abs() + stored_log_p.abs()) + sum(
        (spread + spread.amax(-1, keepdim=True)) / temperature for spread in (spread_s, spread_t))
    may_flip = (torch.sign(stored_gap) != torch.sign(log_q - log_p)) | (stored_gap.abs() <= slack)
    q = torch.maximum(log_q, stored_log_q).exp()
    flipped = torch.where(may_flip, q, 0.0)
    row_weight = (inputs.upstream.abs() * inputs.mask.cpu()).reshape(-1, 1) / temperature
    shift = row_weight * (flipped + q * flipped.sum(-1, keepdim=True))
    return (
        (shift @ weight[:vocab_size].detach().cpu().double().abs()).norm().item(),
        (shift.t() @ hidden.detach().cpu().double().abs().reshape(-1, hidden.shape[-1])).norm().item(),
        0.0 if bias is None else shift.sum(0).norm().item(),
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtypes", ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)), ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_mixed_dtypes_within_the_dtype_error(divergence, dtypes):
    """A bf16 teacher beside a float32 student and the other way round: within the relative errors of
    test_fused_linear.RELATIVE_ERROR (of the least precise input dtype) of the float64 composition on the same
    rounded inputs; the gradients in the student's dtypes. The TVD's gradients may also differ by its sign flips
    where rounding reorders q_v and p_v (``tvd_sign_flips``)."""
    require_backend("cpu")
    (loss, grads), (expected, expected_grads), inputs = divergence_case("cpu", divergence, "none", 5,
                                                                        student_dtype=dtypes[0],
                                                                        teacher_dtype=dtypes[1])
    assert loss.dtype == torch.float32 and grads[1].dtype == dtypes[0]
    least = min(dtypes, key=lambda d: torch.finfo(d).bits if d != torch.bfloat16 else 0)
    bounds = RELATIVE_ERROR[least]
    assert_relative_error(loss, expected, bounds["values"], "loss")
    flips = tvd_sign_flips(inputs, temperature=1.5) if divergence == "tvd" else (0.0, 0.0, 0.0)
    for name, got, want, flip in zip(("hidden", "weight", "bias"), grads, expected_grads, flips):
        assert_relative_error(got, want, bounds["gradient"], f"grad {name}", absolute=flip)


def test_the_reverse_kl_and_skew_zero_are_the_plain_kls():
    """divergence="reverse_kl" is fused_linear_reverse_kld, bit for bit; a skew of 0 is the plain KL."""
    require_backend("cpu")
    student = projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu")
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    args = (student[0], student[1], teacher[0], teacher[1])
    assert torch.equal(mk.fused_linear_divergence(*args, chunk_size=5), mk.fused_linear_reverse_kld(*args, chunk_size=5))
    assert torch.equal(mk.fused_linear_divergence(*args, divergence="skew_forward_kl", skew=0.0),
                       mk.fused_linear_divergence(*args, divergence="forward_kl"))


@pytest.mark.parametrize("divergence", ("forward_kl", "skew_reverse_kl"))
def test_never_materializes_the_logits(divergence):
    tokens, hidden_size, chunk = 256, 8, 16
    student = leaves(*projection(hidden_size, VOCAB, torch.float32, "cpu", lead=(tokens,)))
    teacher = projection(hidden_size, VOCAB, torch.float32, "cpu", lead=(tokens,))
    with LargestTensor() as largest:
        loss = mk.fused_linear_divergence(student[0], student[1], teacher[0], teacher[1], divergence=divergence,
                                          chunk_size=chunk)
        loss.backward()
    # [chunk, V] buffers, the [V, H] weight gradient and the [N, H] hidden gradient: never [N, V].
    assert largest.numel == max(chunk * VOCAB, VOCAB * hidden_size, tokens * hidden_size)
    assert largest.numel * 8 < tokens * VOCAB


def test_a_fully_masked_mean_is_zero_with_zero_gradients():
    require_backend("cpu")
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu"))
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    none = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    loss = mk.fused_linear_divergence(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                      teacher_bias=teacher[2], divergence="tvd", mask=none)
    loss.backward()
    assert loss.item() == 0 and all((x.grad == 0).all() for x in student)
