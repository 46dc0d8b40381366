"""The fused-linear functions' soft caps (``student_softcap`` / ``teacher_softcap``: logits z -> c tanh(z / c) before
the temperature, Gemma-2's ``final_logit_softcapping``) against the unfused composition: the lm_head matmuls in float64
on the CPU, the cap applied by autograd, then the reference loss; values and the gradients of hidden states, weight
and bias, on every backend, with logits several times the caps (z ~ N(0, 9), caps 1.5 and 2)."""
from __future__ import annotations

import pytest
import torch

import minillm_kernels as mk
from conftest import ALL_BACKENDS, device_for, random_mask, require_backend, tolerance
from test_fused_linear import (
    BATCH, RELATIVE_ERROR, SEQ, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB, as_reference_leaves, assert_gradients_close,
    assert_relative_error, gradients, leaves, projection, unfused_logits,
)

STUDENT_CAP, TEACHER_CAP = 1.5, 2.0  # |z| reaches ~10: the caps saturate (tanh(z / c) within 1e-3 of +-1) often
CAPS = ((STUDENT_CAP, None), (None, TEACHER_CAP), (STUDENT_CAP, TEACHER_CAP))
CAP_IDS = ("student", "teacher", "both")
# The functions, each with its unfused counterpart on logits, its arguments and whether it takes target ids:
# reduction "mean" computes the gradients in the forward, "none" and the others recompute the logits in the backward.
FUNCTIONS = {
    "reverse_kld_mean": (mk.fused_linear_reverse_kld, mk.fused_reverse_kld, dict(reduction="mean"), False),
    "reverse_kld_none": (mk.fused_linear_reverse_kld, mk.fused_reverse_kld, dict(reduction="none"), False),
    "jsd": (mk.fused_linear_divergence, mk.fused_divergence, dict(divergence="jsd", beta=0.3, reduction="none"), False),
    "token_stats": (mk.fused_linear_token_stats, mk.fused_token_stats, dict(mix_alpha=0.2, with_entropy=True), True),
}


def softcapped(logits: torch.Tensor, softcap) -> torch.Tensor:
    """c tanh(z / c), by autograd (the naive composition), or z without a cap."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def scalar_loss(output, upstream):
    """sum of the upstream gradient times the output: per token for a tensor; a KL_t + b log q(y_t) + c H_t for
    ``TokenStats``."""
    if isinstance(output, mk.TokenStats):
        a, b, c = upstream
        return (a * output.reverse_kld + b * output.student_logprob + c * output.entropy).sum()
    return (output * upstream[0]).sum()


def softcap_case(backend, function, caps, dtype, *, chunk_size=4):
    """Ours and the unfused float64 composition on the same (rounded) inputs: (output, grads) each."""
    fused, unfused, kwargs, takes_target = FUNCTIONS[function]
    device = device_for(backend)
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, dtype, device))
    teacher = projection(TEACHER_HIDDEN, VOCAB + 3, dtype, device)
    mask = random_mask(BATCH * SEQ, device).view(BATCH, SEQ)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), device=device).masked_fill(~mask, -100)
    extra = (target,) if takes_target else ()
    kwargs = dict(kwargs, mask=mask, temperature=0.8, vocab_size=VOCAB)
    output = fused(student[0], student[1], teacher[0], teacher[1], *extra, student_bias=student[2],
                   teacher_bias=teacher[2], student_softcap=caps[0], teacher_softcap=caps[1], chunk_size=chunk_size,
                   backend=backend, **kwargs)
    upstream = torch.randn(3, *(() if kwargs.get("reduction") == "mean" else (BATCH, SEQ)), dtype=torch.float64)
    some = output.reverse_kld if takes_target else output
    grads = gradients(scalar_loss(output, upstream.to(device, some.dtype)), student)

    ref_student, ref_teacher = as_reference_leaves(student, teacher)
    capped_student = softcapped(unfused_logits(*ref_student), caps[0])
    expected = unfused(capped_student, softcapped(unfused_logits(*ref_teacher), caps[1]),
                       *(x.cpu() for x in extra), backend="reference", **{**kwargs, "mask": mask.cpu()})
    return (output, grads), (expected, gradients(scalar_loss(expected, upstream), ref_student))


def outputs(output) -> dict:
    if isinstance(output, mk.TokenStats):
        return {name: getattr(output, name) for name in ("reverse_kld", "student_logprob", "teacher_logprob",
                                                         "log_ratio", "importance_weight", "entropy")}
    return {"loss": output}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("caps", CAPS, ids=CAP_IDS)
def test_softcaps_match_the_unfused_composition(backend, function, caps):
    """float64: the student's cap, the teacher's, both; values and the gradients of hidden states, weight, bias."""
    require_backend(backend)
    (output, grads), (expected, expected_grads) = softcap_case(backend, function, caps, torch.float64)
    tol = tolerance(torch.float64)
    for name, got in outputs(output).items():
        torch.testing.assert_close(got.cpu(), outputs(expected)[name], **tol, msg=lambda m: f"{name}: {m}")
    assert_gradients_close(grads, expected_grads, **tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("function", ("reverse_kld_mean", "jsd", "token_stats"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_softcaps_within_the_dtype_error(backend, function, dtype):
    """float32 and bf16, both caps: within test_fused_linear.RELATIVE_ERROR of the float64 composition on the same
    rounded inputs, as without caps. The cap adds roundings: three to the stored logit l = c tanh(z / c) (z / c, tanh,
    times c: within a few u of c, where z's own rounding is u |z|), and its derivative 1 - (l / c)^2 is formed from
    the stored l (as autograd's tanh backward forms it from tanh's output), within ~10 u absolute of the exact one:
    small against the factor where the gradient's norm lies. Largest relative errors over 20 seeds x (cpu,
    reference) x these 3 functions: bf16 8.5e-4 for the values, 2.2e-2 for the gradients; float32 4.0e-7 / 6.8e-7
    (the bounds: 2e-2 / 6e-2 and 7.6e-6)."""
    require_backend(backend)
    (output, grads), (expected, expected_grads) = softcap_case(backend, function, (STUDENT_CAP, TEACHER_CAP), dtype)
    bounds = RELATIVE_ERROR[dtype]
    for name, got in outputs(output).items():
        if name not in ("log_ratio", "importance_weight"):  # (as test_fused_linear.assert_within_dtype_error)
            assert_relative_error(got, outputs(expected)[name], bounds["values"], name)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert got.dtype == dtype
        assert_relative_error(got, want, bounds["gradient"], f"grad {name}")


def test_a_cap_far_above_the_logits_changes_nothing_and_no_cap_is_the_plain_loss():
    """c tanh(z / c) -> z as c grows: a cap of 1e6 over logits of ~10 gives the uncapped loss to float64's tolerance;
    None gives it bit for bit."""
    require_backend("cpu")
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float64, "cpu"))
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float64, "cpu")

    def loss_and_grads(**caps):
        loss = mk.fused_linear_divergence(student[0], student[1], teacher[0], teacher[1], divergence="forward_kl",
                                          student_bias=student[2], teacher_bias=teacher[2], chunk_size=6,
                                          backend="cpu", **caps)
        return loss, gradients(loss, student)

    plain, plain_grads = loss_and_grads()
    none, none_grads = loss_and_grads(student_softcap=None, teacher_softcap=None)
    far, far_grads = loss_and_grads(student_softcap=1e6, teacher_softcap=1e6)
    assert torch.equal(none, plain) and all(torch.equal(g, p) for g, p in zip(none_grads, plain_grads))
    torch.testing.assert_close(far, plain, **tolerance(torch.float64))
    assert_gradients_close(far_grads, plain_grads, **tolerance(torch.float64))


@pytest.mark.parametrize("name", ("student_softcap", "teacher_softcap"))
@pytest.mark.parametrize("value", (0.0, -30.0, float("inf"), float("nan")))
def test_a_cap_that_is_not_finite_and_positive_is_an_error_naming_it(name, value):
    student = projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu")
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    for function in (mk.fused_linear_reverse_kld, mk.fused_linear_divergence):
        with pytest.raises(ValueError, match=f"{name} must be"):
            function(student[0], student[1], teacher[0], teacher[1], **{name: value})


def test_a_cap_with_a_vocabulary_sharded_lm_head_is_refused_by_name():
    """The sharded ops (process_group, DTensor weights) take no caps yet: a clear error, not an uncapped loss."""
    from minillm_kernels import linear

    student = projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu")
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    call = linear._linear_call(*student, *teacher, None, None, 1.0, None, None, "cpu", None)
    assert linear._checked_softcaps(None, None, call._replace(shards=object())) == (None, None)
    with pytest.raises(NotImplementedError, match="student_softcap / teacher_softcap with a vocabulary-sharded"):
        linear._checked_softcaps(None, 30.0, call._replace(shards=object()))
