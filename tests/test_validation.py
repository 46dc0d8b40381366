"""Bad input gets a clear error that names the argument."""
from __future__ import annotations

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
