"""Bad input gets a clear error that names the argument."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import minillm_kernels as mk
from conftest import random_logits

V = 11


def logits(*shape, dtype=torch.float32):
    return random_logits(int(torch.tensor(shape[:-1]).prod()), shape[-1], dtype, torch.device("cpu")).view(shape)


def call(student=None, teacher=None, target=None, **kwargs):
    student = logits(2, 3, V) if student is None else student
    teacher = logits(2, 3, V) if teacher is None else teacher
    target = torch.randint(0, V, (2, 3)) if target is None else target
    kwargs.setdefault("backend", "reference")
    return mk.fused_token_stats(student, teacher, target, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(student=logits(2, 4, V)), ValueError, "must agree on every dimension"),
        (dict(teacher=logits(2, 3, V + 2)), ValueError, "pass vocab_size"),
        (dict(student=torch.randint(0, 5, (2, 3, V))), TypeError, "student_logits must be a floating-point"),
        (dict(student=[[1.0]]), TypeError, "student_logits must be a tensor"),
        (dict(student=torch.tensor(1.0), teacher=torch.tensor(1.0)), ValueError, "shape \\[..., V\\]"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have the logits' leading shape"),
        (dict(mask=torch.ones(2, 3)), TypeError, "mask must be a bool tensor"),
        (dict(target=torch.randint(0, V, (3, 2))), ValueError, "target_ids must have the logits' leading shape"),
        (dict(target=torch.rand(2, 3)), TypeError, "target_ids must be an integer tensor"),
        (dict(target=torch.full((2, 3), V)), ValueError, "target_ids must lie in"),
        (dict(target=torch.full((2, 3), -1)), ValueError, "target_ids must lie in"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(vocab_size=V + 1), ValueError, "vocab_size must be an int in"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(backend="tpu"), ValueError, "backend must be 'auto' or one of"),
        (dict(mix_alpha=1.5), ValueError, "mix_alpha"),
        (dict(weight_clip=(2.0, 1.0)), ValueError, "weight_clip"),
        (dict(weight_clip=("0.5", "2")), TypeError, r"weight_clip\[0\] \(lo\) must be a number, got str"),
        (dict(weight_clip=0.5), ValueError, r"weight_clip must be None or a pair \(lo, hi\)"),
        (dict(weight_clip=(0.5, float("nan"))), ValueError, r"weight_clip\[1\] \(hi\) must be a finite number"),
        (dict(vocab_size=np.int64(V + 1)), ValueError, "vocab_size must be an int in"),
        (dict(vocab_size=5.0), TypeError, "vocab_size must be an int, got float"),
        (dict(vocab_size="11"), TypeError, "vocab_size must be an int, got str"),
        (dict(temperature="1.0"), TypeError, "temperature must be a number, got str"),
        (dict(temperature=torch.tensor([1.0, 2.0])), TypeError, "temperature must be a number, got Tensor"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
        (dict(mix_alpha="0.2"), TypeError, "mix_alpha must be a number"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        call(**kwargs)


def test_masked_positions_may_hold_out_of_range_targets():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    target = torch.randint(0, V, (2, 3)).masked_fill(~mask, -100)
    stats = call(target=target, mask=mask)
    assert (stats.student_logprob[~mask] == 0).all()


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        mk.fused_reverse_kld(logits(3, V), logits(3, V), reduction="avg")


def test_unavailable_backend_is_named():
    with pytest.raises(ValueError, match="backend 'cuda' is not available here"):
        mk.fused_reverse_kld(logits(3, V), logits(3, V), backend="cuda")


def test_cpu_backend_refuses_other_devices():
    if "cpu" not in mk.available_backends():
        pytest.skip("the C++ CPU kernel is not built here")
    meta = torch.empty(3, V, device="meta")
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors"):
        mk.fused_reverse_kld(meta, meta, backend="cpu")


def test_student_and_teacher_on_different_devices():
    with pytest.raises(ValueError, match="student_logits is on cpu but teacher_logits is on meta"):
        mk.fused_reverse_kld(logits(3, V), torch.empty(3, V, device="meta"))


def test_mask_on_another_device():
    with pytest.raises(ValueError, match="mask is on meta"):
        mk.fused_reverse_kld(logits(3, V), logits(3, V), mask=torch.ones(3, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("vocab_size", (np.int64(V), np.int32(V), torch.tensor(V)))
@pytest.mark.parametrize("temperature", (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.int64(2)))
def test_numpy_scalars_and_0_dim_tensors_are_numbers(vocab_size, temperature):
    student, teacher = logits(2, 3, V), logits(2, 3, V)
    target = torch.randint(0, V, (2, 3))
    got = call(student=student, teacher=teacher, target=target, vocab_size=vocab_size, temperature=temperature)
    want = call(student=student, teacher=teacher, target=target, vocab_size=V, temperature=float(temperature))
    for x, y in zip(got[:5], want[:5]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_teacher_that_requires_grad_is_warned_about_once_and_gets_none(monkeypatch):
    from minillm_kernels import validation

    monkeypatch.setattr(validation, "_warned_about_teacher_grad", False)
    student, teacher = logits(2, 3, V).requires_grad_(), logits(2, 3, V).requires_grad_()
    with pytest.warns(UserWarning, match=r"teacher_logits requires grad.*torch.no_grad\(\)"):
        stats = call(student=student, teacher=teacher, backend="auto")
    assert not stats.teacher_logprob.requires_grad and not stats.log_ratio.requires_grad
    assert stats.student_logprob.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        mk.fused_reverse_kld(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_importance_weight_where_the_student_gives_the_target_no_mass(backend):
    """w = q(y) / (alpha p(y) + (1 - alpha) q(y)) is exactly 1 at alpha = 0 and 0 where q(y) = 0 < alpha, even
    where p(y) = 0 as well (never 0/0 = NaN)."""
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    student, teacher = logits(4, V), logits(4, V)
    target = torch.tensor([1, 2, 3, 4])
    student[0, 1] = student[1, 2] = -math.inf  # q(y) = 0
    teacher[1, 2] = -math.inf  # and p(y) = 0
    for alpha, expected in ((0.0, 1.0), (0.2, 0.0), (1.0, 0.0)):
        w = mk.fused_token_stats(student, teacher, target, mix_alpha=alpha, backend=backend).importance_weight
        assert (w[:2] == expected).all(), (alpha, w)
        assert torch.isfinite(w[2:]).all() and (w[2:] > 0).all()


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_reductions_follow_their_definitions(backend):
    """"sum" and "mean" against the per-token "none" of the same call: sum over the unmasked tokens, divided by
    their count (an independent check of the reduction code that every backend shares)."""
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    student, teacher = logits(2, 5, V).requires_grad_(), logits(2, 5, V)
    mask = torch.rand(2, 5) < 0.6
    mask[0, 0], mask[1, 4] = True, False
    per_token = mk.fused_reverse_kld(student, teacher, mask=mask, reduction="none", backend=backend)
    grads = {}
    for reduction, expected in (("sum", per_token[mask].sum()), ("mean", per_token[mask].sum() / mask.sum())):
        loss = mk.fused_reverse_kld(student, teacher, mask=mask, reduction=reduction, backend=backend)
        torch.testing.assert_close(loss, expected)
        grads[reduction] = torch.autograd.grad(loss, student)[0]
    torch.testing.assert_close(grads["mean"], grads["sum"] / mask.sum())


# The smallest temperature whose reciprocal k = 1/T (received in float64, applied in the compute dtype) is finite.
SMALLEST_TEMPERATURE = {torch.float32: 1 / torch.finfo(torch.float32).max, torch.float64: 5.56268464626801e-309}


@pytest.mark.parametrize("function", ("logits", "linear"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32, torch.float64), ids=str)
def test_a_temperature_whose_reciprocal_overflows_is_refused_by_name(function, dtype):
    """Every backend scales the logits by k = 1/T in float32 (float64 for float64 logits or weights): a T whose 1/T
    overflows there is a ValueError naming temperature and the smallest it may be, before any backend runs."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    smallest = SMALLEST_TEMPERATURE[compute]
    student, teacher = logits(3, V, dtype=dtype), logits(3, V, dtype=dtype)
    for temperature in (smallest / 2, math.nextafter(smallest, 0.0)):
        for backend in ("reference", "auto"):
            with pytest.raises(ValueError, match=rf"temperature must be >= {smallest!r} .*{str(compute)[6:]}"):
                if function == "logits":
                    mk.fused_divergence(student, teacher, divergence="jsd", temperature=temperature, backend=backend)
                else:
                    weight = torch.randn(V, 4, dtype=dtype)
                    mk.fused_linear_divergence(torch.randn(3, 4, dtype=dtype), weight, torch.randn(3, 4, dtype=dtype),
                                               weight, divergence="jsd", temperature=temperature, backend=backend)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_the_smallest_temperature_gives_the_float64_answer_on_every_backend(dtype):
    """At the smallest T allowed (where k = 1/T is the dtype's largest number) every backend gives the float64
    reference's values rounded to the dtype: the logits are centred on their row's maximum before they are scaled,
    so no finite logit overflows that would not in float64 (issue 20's r12)."""
    student = torch.tensor([[1.0, 2.0, 3.0, 3.0], [0.5, -1.0, 2.0, 0.1]], dtype=dtype)
    teacher = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.3, -1.0, 2.5, 0.1]], dtype=dtype)
    temperature = SMALLEST_TEMPERATURE[dtype]
    for backend in ("reference", "cpu", "triton"):
        if backend not in mk.available_backends():
            continue
        for divergence in ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
            exact = mk.fused_divergence(student.double(), teacher.double(), divergence=divergence,
                                        temperature=temperature, reduction="none", backend="reference")
            got = mk.fused_divergence(student, teacher, divergence=divergence, temperature=temperature,
                                      reduction="none", backend=backend)
            torch.testing.assert_close(got, exact.to(dtype), rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{backend} {divergence}: {m}")


@pytest.mark.parametrize("backend", ("reference", "cpu", "triton"))
@pytest.mark.parametrize("argument", ("temperature", "beta", "skew"))
def test_a_scalar_tensor_that_requires_grad_is_refused_on_every_backend(backend, argument):
    """No backend differentiates with respect to the temperature, beta or skew (the gradient flows to the student's
    logits only): a 0-dim tensor that requires grad is a TypeError naming it on every backend, never a gradient that
    one backend computes and the others silently drop (issue 20's r17)."""
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    value = torch.tensor(0.7 if argument == "temperature" else 0.3, requires_grad=True)
    divergence = "skew_forward_kl" if argument == "skew" else "jsd"
    student = logits(2, 3, V).requires_grad_()
    with pytest.raises(TypeError, match=rf"{argument} is a tensor that requires grad.*{argument}.detach\(\)"):
        mk.fused_divergence(student, logits(2, 3, V), divergence=divergence, backend=backend, **{argument: value})
    if argument == "temperature":
        with pytest.raises(TypeError, match="temperature is a tensor that requires grad"):
            call(student=student, temperature=value, backend=backend)
    detached = mk.fused_divergence(student, logits(2, 3, V), divergence=divergence, backend=backend,
                                   **{argument: value.detach()})
    assert detached.requires_grad
