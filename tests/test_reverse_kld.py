"""Every backend against the float64 oracle (conftest.exact_token_stats): values, gradients, dtype pairs, masks,
padding, out-of-range targets, extreme inputs, float32 accuracy at a realistic size, and the CPU kernel's build."""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import minillm_kernels as mk
from conftest import (
    ALL_BACKENDS,
    FLOAT_DTYPES,
    KERNEL_BACKENDS,
    GradientErrorScale,
    accumulation_dtype,
    assert_gradient_within,
    assert_stats_within,
    assert_within,
    device_for,
    exact_token_stats,
    naive_gradient_may_overflow,
    per_token_bound,
    random_logits,
    random_mask,
    require_backend,
)
from minillm_kernels import reference
from minillm_kernels.ops import reverse_kld as ops

ODD_VOCAB = 1031  # not a multiple of any block size
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def stats_and_gradient(backend, student, teacher, target, upstream, **kwargs):
    """TokenStats and d/d(student) of sum(a KL + b log q(y) + c H) with upstream (a, b, c)."""
    student = student.detach().clone().requires_grad_()
    stats = mk.fused_token_stats(student, teacher, target, with_entropy=True, backend=backend, **kwargs)
    a, b, c = (u.to(student.device, stats.reverse_kld.dtype) for u in upstream)
    loss = (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum()
    (grad,) = torch.autograd.grad(loss, student)
    return stats, grad


def oracle_of(student, teacher, target, upstream, *, backend=None, **kwargs):
    """The oracle on the same (rounded) inputs, with the public functions' keyword arguments.

    For the reference ``backend`` with float32 accumulation and T != 1, the oracle of what the reference promises:
    it divides the logits by T in float32 first (``reference._scaled``), one rounding of each s'_v, which moves
    log q_v by up to a few u |s'_v|, far more than its bound's 2e-5 |log q_v| where |s'| >> |log q| (s' ~ 1e30 with
    log q(y) ~ 1e27, or T = 1e-10); so it is held to the exact terms of those rounded fl(s / T), fl(t / T) at T = 1,
    and to d/ds = (1/T) d/ds'. The kernels compute (s_v - c) / T, whose rounding is relative to log q_v itself."""
    kwargs = {k: v for k, v in kwargs.items() if k in ("mask", "temperature", "vocab_size", "mix_alpha")}
    temperature = kwargs.pop("temperature", 1.0)
    divides_first = accumulation_dtype(student.dtype, teacher.dtype) == torch.float32 and temperature != 1.0
    if backend != "reference" or not divides_first:
        return exact_token_stats(student, teacher, target, upstream, temperature=temperature, **kwargs)
    scaled = (x.detach().cpu().float() / temperature for x in (student, teacher))  # as reference._scaled divides
    exact = exact_token_stats(*scaled, target, upstream, temperature=1.0, **kwargs)
    if exact.grad is None:
        return exact
    k = 1.0 / temperature
    return exact._replace(grad=k * exact.grad, grad_error=GradientErrorScale(*(k * x for x in exact.grad_error)))


def check_against_oracle(backend, student, teacher, target, upstream, **kwargs):
    """Run ``backend`` and assert its per-token terms and gradient within the derived bounds of the oracle."""
    stats, grad = stats_and_gradient(backend, student, teacher, target, upstream, **kwargs)
    exact = oracle_of(student, teacher, target, upstream, backend=backend, **kwargs)
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    assert stats.reverse_kld.dtype == acc and grad.dtype == student.dtype and grad.shape == student.shape
    naive = backend == "reference"
    assert_stats_within(stats, exact, acc, naive=naive)
    assert_gradient_within(grad, exact, acc, naive=naive, temperature=kwargs.get("temperature", 1.0))
    return stats, grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("student_dtype", FLOAT_DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("teacher_dtype", FLOAT_DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 2.0))
def test_token_stats_and_gradient_match_the_oracle(backend, student_dtype, teacher_dtype, temperature):
    """Every pair of logits dtypes, each input read in its own: per-token terms in promote(student, teacher, float32)
    within that dtype's bound, the gradient in the student's dtype within its rounding (float64 arithmetic when
    either is float64)."""
    require_backend(backend)
    device = device_for(backend)
    rows = 7
    student = random_logits(rows, ODD_VOCAB, student_dtype, device)
    teacher = random_logits(rows, ODD_VOCAB, teacher_dtype, device)
    target = torch.randint(0, ODD_VOCAB, (rows,), device=device)
    mask = random_mask(rows, device)
    target[~mask] = -100  # ignored ids where masked must be accepted
    upstream = torch.randn(3, rows, dtype=torch.float64)
    _, grad = check_against_oracle(backend, student, teacher, target, upstream, mask=mask, temperature=temperature,
                                   mix_alpha=0.2)
    assert (grad[~mask] == 0).all()


def bytes_allocated(fn, device) -> int:
    """Bytes ``fn()`` allocates on ``device``, in all (every allocation counted, freed or not)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
        fn()
        torch.cuda.synchronize()
        return torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("student_dtype, teacher_dtype", [(torch.float32, torch.bfloat16),
                                                          (torch.bfloat16, torch.float64)],
                         ids=("fp32-bf16", "bf16-fp64"))
def test_mixed_dtypes_copy_no_logits(backend, student_dtype, teacher_dtype):
    """Neither input is converted: the forward allocates less than one [N, V] bf16 tensor, the backward the gradient
    (in the student's dtype) and less than one more."""
    require_backend(backend)
    device = device_for(backend)
    rows, vocab = 8, 4099
    student = random_logits(rows, vocab, student_dtype, device).requires_grad_()
    teacher = random_logits(rows, vocab, teacher_dtype, device)
    target = torch.randint(0, vocab, (rows,), device=device)
    smallest_logits = rows * vocab * 2
    outputs = []
    forward = bytes_allocated(
        lambda: outputs.append(mk.fused_token_stats(student, teacher, target, with_entropy=True, backend=backend)),
        device,
    )
    stats = outputs[0]
    loss = (stats.reverse_kld + stats.student_logprob + stats.entropy).sum()
    backward = bytes_allocated(loss.backward, device)
    assert student.grad.dtype == student_dtype
    assert forward < smallest_logits, f"the forward allocated {forward} bytes"
    assert backward < student.grad.nbytes + smallest_logits, f"the backward allocated {backward} bytes"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_reverse_kld_reductions_with_upstream_gradient(backend, reduction):
    require_backend(backend)
    device = device_for(backend)
    batch, seq = 2, 5
    student = random_logits(batch * seq, ODD_VOCAB, torch.float32, device).view(batch, seq, ODD_VOCAB)
    teacher = random_logits(batch * seq, ODD_VOCAB, torch.float32, device).view(batch, seq, ODD_VOCAB)
    mask = random_mask(batch * seq, device).view(batch, seq)
    leaf = student.detach().clone().requires_grad_()
    loss = mk.fused_reverse_kld(leaf, teacher, mask=mask, reduction=reduction, backend=backend)
    upstream = torch.linspace(-1.5, 2.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    assert loss.shape == ((batch, seq) if reduction == "none" else ())

    # The per-token upstream a of each reduction, and the oracle's KL reduced the same way.
    mask_cpu, up = mask.cpu(), upstream.detach().cpu().double()
    count = mask_cpu.sum().clamp(min=1)
    a = {"none": up, "sum": up.expand(batch, seq), "mean": up.expand(batch, seq) / count}[reduction]
    exact = exact_token_stats(student, teacher, None, torch.stack([a, 0 * a, 0 * a]), mask=mask_cpu)
    naive = backend == "reference"
    kl_bound = per_token_bound(exact.reverse_kld, torch.float32, naive=naive)
    if reduction == "none":
        assert_within(loss, exact.reverse_kld, kl_bound, "loss")
        assert (loss[~mask] == 0).all()
    else:
        scale = 1 if reduction == "sum" else count
        # The per-token bounds add up, plus float32 rounding of the sum over the tokens (at most one u per term).
        bound = (kl_bound.sum() + batch * seq * 2**-24 * exact.reverse_kld.abs().sum()) / scale
        assert_within(loss, exact.reverse_kld.sum() / scale, bound, "loss")
    assert_gradient_within(grad, exact, torch.float32, naive=naive)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mean_over_fully_masked_input_is_zero_with_zero_gradient(backend):
    require_backend(backend)
    device = device_for(backend)
    student = random_logits(4, ODD_VOCAB, torch.float32, device).requires_grad_()
    teacher = random_logits(4, ODD_VOCAB, torch.float32, device)
    mask = torch.zeros(4, dtype=torch.bool, device=device)
    loss = mk.fused_reverse_kld(student, teacher, mask=mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert (student.grad == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("wider", ("teacher", "student"))
def test_vocab_size_ignores_padding_columns(backend, wider):
    require_backend(backend)
    device = device_for(backend)
    rows, vocab = 5, ODD_VOCAB
    widths = {"teacher": vocab + 61, "student": vocab + 29}
    widths[{"teacher": "student", "student": "teacher"}[wider]] = vocab
    student = random_logits(rows, widths["student"], torch.float32, device)
    teacher = random_logits(rows, widths["teacher"], torch.float32, device)
    student[:, vocab:] = 50.0  # padding that would dominate the softmax if it were read
    teacher[:, vocab:] = 50.0
    target = torch.randint(0, vocab, (rows,), device=device)
    upstream = torch.randn(3, rows, dtype=torch.float64)
    _, grad = check_against_oracle(backend, student, teacher, target, upstream, vocab_size=vocab)
    assert (grad[:, vocab:] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_extreme_logits_as_accurate_as_naive_float32(backend):
    """|logits| ~ 1e4 in float32: the per-token terms' error against float64 stays within 4x the naive float32 loss's
    error, the gradient within its derived bound (``gradient_bound``: a ratio to the naive gradient's error fails
    where two near-tied columns give |log q_v - log p_v| ~ 2e4 and the naive rounding happens to be 0.5 ulp)."""
    require_backend(backend)
    device = device_for(backend)
    rows = 6
    student = random_logits(rows, ODD_VOCAB, torch.float32, device, scale=1e4)
    teacher = random_logits(rows, ODD_VOCAB, torch.float32, device, scale=1e4)
    teacher[1] = student[1] + 1e4  # a shifted copy: KL = 0 up to rounding
    target = torch.randint(0, ODD_VOCAB, (rows,), device=device)
    upstream = torch.randn(3, rows, dtype=torch.float64)
    stats, grad = stats_and_gradient(backend, student, teacher, target, upstream)
    naive, _ = stats_and_gradient("reference", student.cpu(), teacher.cpu(), target.cpu(), upstream)
    exact = exact_token_stats(student, teacher, target, upstream)
    for name in ("reverse_kld", "student_logprob", "teacher_logprob", "entropy"):
        error = (getattr(stats, name).cpu().double() - getattr(exact, name)).abs().max()
        naive_error = (getattr(naive, name).double() - getattr(exact, name)).abs().max()
        assert error <= 4 * naive_error + 1e-3, f"{name}: error {error} vs naive float32 {naive_error}"
    assert_gradient_within(grad.cpu(), exact, torch.float32)


# |logits / T| far from 1: (dtype, temperature, how the randn logits are transformed). The CPU kernel gave NaN/inf for
# the first three (issue 11, item 3), Triton NaN for the last two (item 5); the float64 oracle is finite for all.
LARGE_SCALE_CASES = {
    "fp32-T1e-10": (torch.float32, 1e-10, lambda x: x),
    "fp32-1e30-T0.7": (torch.float32, 0.7, lambda x: x * 1e30),
    "fp64-1e30-T0.7": (torch.float64, 0.7, lambda x: x * 1e30),
    "fp32-all-below-minus-3e38": (torch.float32, 1.0, lambda x: -3.1e38 - x.abs() * 1e36),
    "fp32-max-above-4e37": (torch.float32, 1.0, lambda x: x * 4e37),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", LARGE_SCALE_CASES)
def test_large_logits_over_temperature_stay_finite_and_exact(backend, case):
    """Wherever the float64 oracle is finite, every backend is finite and within its bounds of it; the reference's
    float32 gradient only where its autograd's terms stay below float32's largest value (``max-above-4e37``: logits
    ~4e37 and an upstream gradient of ~2.5 overflow them in 2-3% of draws; conftest.naive_gradient_may_overflow)."""
    require_backend(backend)
    device = device_for(backend)
    dtype, temperature, transform = LARGE_SCALE_CASES[case]
    rows, vocab = 4, 64
    student = transform(torch.randn(rows, vocab, dtype=torch.float64)).to(dtype).to(device)
    teacher = transform(torch.randn(rows, vocab, dtype=torch.float64)).to(dtype).to(device)
    target = torch.randint(0, vocab, (rows,), device=device)
    upstream = torch.randn(3, rows, dtype=torch.float64)
    exact = oracle_of(student, teacher, target, upstream, temperature=temperature)
    assert all(torch.isfinite(x).all() for x in exact[:6]) and torch.isfinite(exact.grad).all()
    stats, grad = check_against_oracle(backend, student, teacher, target, upstream, temperature=temperature)
    assert all(torch.isfinite(x).all() for x in stats)
    if backend == "reference":  # (its promise at the float32 range's edge: conftest.naive_gradient_may_overflow)
        grad = grad[~naive_gradient_may_overflow(exact, accumulation_dtype(dtype), temperature).to(grad.device)]
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_terms_near_the_float32_limit_are_differenced_before_scaling(backend):
    """A student peaked where the teacher's log-probability is ~ -2.4e38 (logits of +-1.2e38, as
    ``fp32-max-above-4e37`` draws with MINILLM_TEST_SEED=1826878794): log q_v - log p_v and KL are both ~2.4e38 and
    cancel in the peak's gradient, but a log p_v and a KL, each times a = 2.5, overflow float32 (Triton's
    backward formed (a - c) log q_v - a log p_v - a KL and gave inf - inf = NaN). Every kernel stays within its bound."""
    require_backend(backend)
    device = device_for(backend)
    rows, vocab, peak, teacher_top = 3, 64, 5, 9
    student = (torch.randn(rows, vocab, dtype=torch.float64) * 1e36).float()
    student[:, peak] = 1.2e38  # q ~ one-hot at the peak
    teacher = (torch.randn(rows, vocab, dtype=torch.float64) * 4e37).float()
    teacher[:, peak], teacher[:, teacher_top] = -1.2e38, 1.2e38  # log p at the peak ~ -2.4e38
    student, teacher = student.to(device), teacher.to(device)
    target = torch.randint(0, vocab, (rows,), device=device)
    upstream = torch.stack([torch.full((rows,), 2.5, dtype=torch.float64), torch.randn(rows, dtype=torch.float64),
                            torch.randn(rows, dtype=torch.float64)])
    _, grad = check_against_oracle(backend, student, teacher, target, upstream)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=DTYPE_NAMES.get)
def test_negative_infinity_columns(backend, dtype):
    """-inf in both models contributes 0; -inf in the student alone gets q = 0 and a zero gradient."""
    require_backend(backend)
    device = device_for(backend)
    rows = 5
    student = random_logits(rows, ODD_VOCAB, dtype, device)
    teacher = random_logits(rows, ODD_VOCAB, dtype, device)
    both, student_only = [3, 500, ODD_VOCAB - 1], [10, 1024]
    student[:, both + student_only] = float("-inf")
    teacher[:, both] = float("-inf")
    target = torch.randint(11, 500, (rows,), device=device)
    upstream = torch.randn(3, rows, dtype=torch.float64)
    stats, grad = check_against_oracle(backend, student, teacher, target, upstream, mix_alpha=0.2)
    assert all(torch.isfinite(x).all() for x in stats)
    assert (grad[:, both + student_only] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mix_alpha", (0.0, 0.2, 1.0))
def test_importance_weight_and_clip(backend, mix_alpha):
    require_backend(backend)
    device = device_for(backend)
    rows = 9
    student = random_logits(rows, ODD_VOCAB, torch.float32, device)
    teacher = random_logits(rows, ODD_VOCAB, torch.float32, device)
    target = torch.randint(0, ODD_VOCAB, (rows,), device=device)
    stats = mk.fused_token_stats(student, teacher, target, mix_alpha=mix_alpha, backend=backend)
    q, p = stats.student_logprob.double().exp(), stats.teacher_logprob.double().exp()
    formula = q / (mix_alpha * p + (1 - mix_alpha) * q)
    torch.testing.assert_close(stats.importance_weight.double(), formula, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.log_ratio.double(), (p.log() - q.log()), rtol=1e-5, atol=1e-5)
    if mix_alpha == 0.0:
        assert (stats.importance_weight == 1).all()
    clipped = mk.fused_token_stats(
        student, teacher, target, mix_alpha=mix_alpha, weight_clip=(0.9, 1.1), backend=backend
    )
    torch.testing.assert_close(clipped.importance_weight, stats.importance_weight.clamp(0.9, 1.1))
    assert not stats.importance_weight.requires_grad and not stats.log_ratio.requires_grad
    assert stats.entropy is None


# ---------------------------------------------------------------------------------------------------------------
# Strided inputs, taken without a copy (issue 12, item 1): the leading dimensions may have any strides.
# ---------------------------------------------------------------------------------------------------------------
def strided_view(layout, lead, width, dtype, device):
    """``(base, view)``: fresh random logits ``base`` and a ``[*lead, width]`` view of them laid out as ``layout``
    says (``view(base)`` gives it: a function, so that the view can be taken of a leaf that requires grad)."""
    *outer, seq = lead
    if layout == "contiguous":
        return random_logits(math.prod(lead), width, dtype, device).view(*lead, width), lambda x: x
    if layout == "response_slice":  # response_logits: logits[:, -(N+1):-1] of a model's [B, L, V] output
        base = random_logits(math.prod(outer) * (seq + 3), width, dtype, device).view(*outer, seq + 3, width)
        return base, lambda x: x[..., -(seq + 1):-1, :]
    if layout == "transposed":  # sequence-first [T, B, V] seen as [B, T, V]
        base = random_logits(math.prod(lead), width, dtype, device).view(seq, *outer, width)
        return base, lambda x: x.movedim(0, -2)
    if layout == "column_slice":  # [..., :V] of wider rows
        base = random_logits(math.prod(lead), width + 13, dtype, device).view(*lead, width + 13)
        return base, lambda x: x[..., :width]
    if layout == "expanded":  # one sequence's logits for the whole batch: stride 0 over the batch
        base = random_logits(seq, width, dtype, device).view(*[1] * len(outer), seq, width)
        return base, lambda x: x.expand(*lead, width)
    if layout == "every_other_row":  # every leading dimension strided on its own: three levels for three of them
        base = random_logits(math.prod(lead) * 2 ** len(lead), width, dtype, device).view(*(2 * d for d in lead), width)
        return base, lambda x: x[(slice(None, None, 2),) * len(lead)]
    raise ValueError(layout)


# name: (student layout, teacher layout, teacher padding columns, leading shape)
STRIDED_CASES = {
    "response_slice": ("response_slice", "response_slice", 0, (3, 4)),
    "transposed": ("transposed", "transposed", 0, (3, 4)),
    "column_slice": ("column_slice", "column_slice", 0, (3, 4)),
    "expanded_teacher": ("response_slice", "expanded", 0, (3, 4)),
    "different_layouts_padded_teacher": ("transposed", "response_slice", 61, (3, 4)),
    "three_levels_copied": ("every_other_row", "transposed", 0, (2, 3, 4)),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", STRIDED_CASES)
@pytest.mark.parametrize("student_dtype, teacher_dtype", [(torch.float32, torch.float32),
                                                          (torch.bfloat16, torch.float32)],
                         ids=("fp32-fp32", "bf16-fp32"))
def test_strided_views_match_the_oracle(backend, case, student_dtype, teacher_dtype):
    """Values and gradients of views whose leading dimensions have any strides, against the oracle; the gradient
    reaches the tensor the student's view was taken of, there and nowhere else."""
    require_backend(backend)
    device = device_for(backend)
    student_layout, teacher_layout, teacher_padding, lead = STRIDED_CASES[case]
    student_base, student_view = strided_view(student_layout, lead, ODD_VOCAB, student_dtype, device)
    teacher_base, teacher_view = strided_view(teacher_layout, lead, ODD_VOCAB + teacher_padding, teacher_dtype,
                                              device)
    student_base.requires_grad_()
    student, teacher = student_view(student_base), teacher_view(teacher_base)
    assert not student.is_contiguous() and not teacher.is_contiguous()
    mask = random_mask(math.prod(lead), device).view(lead)
    target = torch.randint(0, ODD_VOCAB, lead, device=device).masked_fill(~mask, -100)
    stats = mk.fused_token_stats(student, teacher, target, mask=mask, temperature=0.7, mix_alpha=0.2,
                                 with_entropy=True, vocab_size=ODD_VOCAB, backend=backend)
    upstream = torch.randn(3, *lead, dtype=torch.float64)
    a, b, c = (u.to(device, stats.reverse_kld.dtype) for u in upstream)
    loss = (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum()
    grad, base_grad = torch.autograd.grad(loss, (student, student_base))

    exact = exact_token_stats(student, teacher, target, upstream, mask=mask, temperature=0.7,
                              vocab_size=ODD_VOCAB, mix_alpha=0.2)
    acc = accumulation_dtype(student_dtype, teacher_dtype)
    assert grad.shape == student.shape and grad.dtype == student_dtype
    assert_stats_within(stats, exact, acc, naive=backend == "reference")
    assert_gradient_within(grad, exact, acc, naive=backend == "reference")
    expected_base_grad = torch.zeros_like(student_base)
    student_view(expected_base_grad).copy_(grad)
    assert torch.equal(base_grad, expected_base_grad)


class LargeTensors(TorchDispatchMode):
    """Records ``(op, shape)`` of every tensor of at least ``numel`` elements that an operation creates (a view, which
    shares the storage of one of the op's inputs, is not a creation). It sees the ops the public functions call and
    the outputs of our custom ops, not what runs inside them (``bytes_allocated`` counts that)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.created: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.numel() >= self.numel and x.untyped_storage().data_ptr() not in inputs:
                self.created.append((str(func), tuple(x.shape)))
        return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_response_slice_allocates_only_its_gradient(backend):
    """The trainer's inputs, ``logits[:, -(N+1):-1]`` of both models' [B, L, V] outputs (a bf16 teacher, an fp32
    student): forward and backward create one tensor of N V elements or more, the student's gradient [B, N, V]
    (before: a copy of each input as well). Counted both as the tensors the ops create (``LargeTensors``) and as
    the bytes allocated anywhere, the kernels' insides included (less than the gradient and one bf16 [N, V])."""
    require_backend(backend)
    device = device_for(backend)
    batch, response, vocab = 2, 5, 4099
    student_base, response_slice = strided_view("response_slice", (batch, response), vocab, torch.float32, device)
    teacher_base, _ = strided_view("response_slice", (batch, response), vocab, torch.bfloat16, device)
    student_base.requires_grad_()
    student, teacher = response_slice(student_base), response_slice(teacher_base)
    target = torch.randint(0, vocab, (batch, response), device=device)
    grads = []

    def forward_and_backward():
        stats = mk.fused_token_stats(student, teacher, target, with_entropy=True, backend=backend)
        loss = (stats.reverse_kld + stats.student_logprob + stats.entropy).sum()
        grads.extend(torch.autograd.grad(loss, student))

    with LargeTensors(batch * response * vocab) as large:
        allocated = bytes_allocated(forward_and_backward, device)
    assert large.created == [("minillm_kernels.token_stats_backward.default", (batch, response, vocab))]
    assert allocated < grads[0].nbytes + batch * response * vocab * 2, f"{allocated} bytes allocated"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_tokens(backend):
    require_backend(backend)
    device = device_for(backend)
    student = random_logits(0, ODD_VOCAB, torch.float32, device).view(2, 0, ODD_VOCAB).requires_grad_()
    teacher = random_logits(0, ODD_VOCAB, torch.float32, device).view(2, 0, ODD_VOCAB)
    for reduction in ("mean", "sum"):
        loss = mk.fused_reverse_kld(student, teacher, reduction=reduction, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and student.grad.shape == student.shape
    assert mk.fused_reverse_kld(student, teacher, reduction="none", backend=backend).shape == (2, 0)
    target = torch.zeros(2, 0, dtype=torch.long, device=device)
    stats = mk.fused_token_stats(student, teacher, target, with_entropy=True, backend=backend)
    assert all(x.shape == (2, 0) for x in stats)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ("contiguous", "response_slice"))
def test_torch_compile_fullgraph_matches_eager(backend, layout):
    """Compiled in full, as eager: also on the trainer's [:, -(N+1):-1] slices (the strides reach the ops' fake
    implementations as metadata)."""
    require_backend(backend)
    device = device_for(backend)

    def loss_fn(student, teacher, mask):
        return 0.5 * mk.fused_reverse_kld(view(student), view(teacher), mask=mask, temperature=2.0, backend=backend)

    student, view = strided_view(layout, (2, 3), ODD_VOCAB, torch.float32, device)
    teacher, _ = strided_view(layout, (2, 3), ODD_VOCAB, torch.bfloat16, device)  # a bf16 teacher, an fp32 student
    mask = random_mask(6, device).view(2, 3)
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        leaf = student.clone().requires_grad_()
        loss = fn(leaf, teacher, mask)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


# ---------------------------------------------------------------------------------------------------------------
# Out-of-range target ids (issue 11, item 1): what a torch.compile graph gets, where the eager ValueError cannot run.
# ---------------------------------------------------------------------------------------------------------------
def out_of_range_case(device, vocab):
    """Rows 0-1 in range, 2-7 out of range (V, -1, +-1e9, +-2^62), 8-9 masked with ignore ids; the mask."""
    target = torch.tensor([0, vocab - 1, vocab, -1, 10**9, -(10**9), 2**62, -(2**62), -100, 10**9], device=device)
    mask = torch.ones(10, dtype=torch.bool, device=device)
    mask[8:] = False
    return target, mask


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_targets_give_nan_log_probabilities_and_a_gradient_without_the_one_hot(backend):
    """At the op level (no eager check): NaN log-probabilities where an unmasked target is out of range, every other
    output as usual, and that row's gradient through log q(y) = s'_y - lse(s') without the one-hot (its -b q_v
    stays); no read outside the row (the Triton interpreter segfaulted on ids of 1e9, a GPU would fault)."""
    require_backend(backend)
    device = device_for(backend)
    vocab = 64
    target, mask = out_of_range_case(device, vocab)
    rows = target.numel()
    for row_mask in (mask, None):
        student = random_logits(rows, vocab, torch.float32, device).requires_grad_()
        teacher = random_logits(rows, vocab, torch.float32, device)
        if backend == "reference":
            kl, student_logprob, teacher_logprob, entropy = reference.token_stats(
                student, teacher, target, row_mask, 0.7, vocab)
        else:
            kl, student_logprob, teacher_logprob, entropy, _ = ops.token_stats(
                student, teacher, target, row_mask, 1 / 0.7, vocab, backend)
        upstream = torch.randn(3, rows, dtype=torch.float64)
        exact = exact_token_stats(student, teacher, target, upstream, mask=row_mask, temperature=0.7)
        naive = backend == "reference"
        for name, got in (("kl", kl), ("student_logprob", student_logprob), ("teacher_logprob", teacher_logprob),
                          ("entropy", entropy)):
            want = getattr(exact, {"kl": "reverse_kld"}.get(name, name))
            assert_within(got, want, per_token_bound(want, torch.float32, naive=naive), name)  # NaN at rows 2-7
        a, b, c = upstream.to(device, torch.float32)
        (grad,) = torch.autograd.grad((a * kl + b * student_logprob + c * entropy).sum(), student)
        assert_gradient_within(grad, exact, torch.float32, naive=naive)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_targets_under_torch_compile(backend):
    """The issue's reproducer, compiled in full: NaN where the id is out of range, the right value elsewhere."""
    require_backend(backend)
    device = device_for(backend)
    student, teacher = random_logits(4, 64, torch.float32, device), random_logits(4, 64, torch.float32, device)
    target = torch.tensor([0, 1, 10**9, -(10**9)], device=device)
    compiled = torch.compile(
        lambda s, t, y: mk.fused_token_stats(s, t, y, backend=backend).student_logprob, fullgraph=True
    )
    got = compiled(student, teacher, target)
    exact = exact_token_stats(student, teacher, target).student_logprob
    assert_within(got, exact, per_token_bound(exact, torch.float32, naive=backend == "reference"), "student_logprob")
    with pytest.raises(ValueError, match="target_ids must lie in"):  # eager mode keeps its check
        mk.fused_token_stats(student, teacher, target, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# Float32 accuracy at a realistic size (issue 11, item 17).
# ---------------------------------------------------------------------------------------------------------------
def assert_per_token_accuracy(backend, rows, vocab, temperature):
    device = device_for(backend)
    student = torch.randn(rows, vocab, device=device)
    teacher = torch.randn(rows, vocab, device=device)
    target = torch.randint(0, vocab, (rows,), device=device)
    stats = mk.fused_token_stats(student, teacher, target, with_entropy=True, temperature=temperature,
                                 backend=backend)
    for start in range(0, rows, 256):  # the float64 oracle a few hundred rows at a time
        part = slice(start, start + 256)
        exact = exact_token_stats(student[part], teacher[part], target[part], temperature=temperature)
        for name in ("reverse_kld", "student_logprob", "teacher_logprob", "entropy"):
            want = getattr(exact, name)
            assert_within(getattr(stats, name)[part], want, per_token_bound(want, torch.float32), name)


@pytest.mark.parametrize("temperature", (1.0, 0.7))
def test_cpu_float32_per_token_accuracy_at_4096_by_32000(temperature):
    """randn logits, 4096 x 32000: every per-token float32 result within 2.5e-7 of float64 (floor 1 nat). Float32 row
    sums reached 1.1e-6 on the KL (the cancellation in k A / Z_s - log Z_s + log Z_t)."""
    require_backend("cpu")
    assert_per_token_accuracy("cpu", 4096, 32000, temperature)


@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_gpu_kernels_float32_per_token_accuracy_at_32000_columns(backend):
    """The same bound at the realistic vocabulary on the GPU kernels (4 rows under Triton's interpreter on a CPU;
    1024 on a GPU, where the float64 oracle on the CPU is the cost)."""
    require_backend(backend)
    rows = 4 if device_for(backend).type == "cpu" else 1024
    assert_per_token_accuracy(backend, rows, 32000, 0.7)


# ---------------------------------------------------------------------------------------------------------------
# The reference's own checks, and NaN handling.
# ---------------------------------------------------------------------------------------------------------------
def test_reference_passes_gradcheck():
    """A second oracle: the reference's autograd gradient equals finite differences in float64."""
    vocab = 13
    student = torch.randn(4, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, vocab, dtype=torch.float64)
    target = torch.randint(0, vocab, (4,))
    mask = torch.tensor([True, True, False, True])

    def terms(student):
        stats = mk.fused_token_stats(
            student, teacher, target, mask=mask, temperature=0.7, with_entropy=True, backend="reference"
        )
        return stats.reverse_kld, stats.student_logprob, stats.entropy

    assert torch.autograd.gradcheck(terms, (student,))


def test_auto_picks_the_cpu_kernel_on_cpu_tensors():
    require_backend("cpu")
    from minillm_kernels import backends

    assert backends.choose_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_logits_give_nan_in_their_row_only(backend):
    """A NaN in the logits is never hidden behind a finite loss, and does not leak into other rows."""
    require_backend(backend)
    device = device_for(backend)
    student = random_logits(4, ODD_VOCAB, torch.float32, device)
    teacher = random_logits(4, ODD_VOCAB, torch.float32, device)
    student[1, 700] = float("nan")
    teacher[2, 5] = float("nan")
    kl = mk.fused_reverse_kld(student, teacher, reduction="none", backend=backend)
    assert kl[1].isnan() and kl[2].isnan()
    assert torch.isfinite(kl[[0, 3]]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_rows_are_not_read_whatever_they_hold(backend):
    """Masked rows holding NaN, +inf or only -inf (a padded position whose logits overflowed) give 0 in every output
    and a gradient of exactly 0, on every backend: nothing of them reaches the weights through the backward."""
    require_backend(backend)
    device = device_for(backend)
    student = random_logits(5, ODD_VOCAB, torch.float32, device)
    teacher = random_logits(5, ODD_VOCAB, torch.float32, device)
    student[1, 3], teacher[2, 8], student[3], teacher[3, 9] = math.nan, math.inf, -math.inf, math.nan
    mask = torch.tensor([True, False, False, False, True], device=device)
    leaf = student.clone().requires_grad_()
    stats = mk.fused_token_stats(leaf, teacher, torch.tensor([0, -100, 7, 2, 5], device=device), mask=mask,
                                 with_entropy=True, backend=backend)
    (stats.reverse_kld + stats.student_logprob + stats.entropy).sum().backward()
    for name, x in stats._asdict().items():
        assert (x[1:4] == 0).all() and x[[0, 4]].isfinite().all(), (name, x)
    assert (leaf.grad[1:4] == 0).all() and leaf.grad[[0, 4]].isfinite().all()


def test_the_oracle_does_not_read_masked_rows_either():
    """reference.py's formulas, which the tests differentiate with autograd, keep that contract too: masked rows
    holding NaN, +inf or only -inf give 0 and a gradient of exactly 0 (the reference backend's kernels give their
    gradient in closed form, zeroing masked rows: reading those rows shows only here)."""
    student = random_logits(5, ODD_VOCAB, torch.float64, torch.device("cpu"))
    teacher = random_logits(5, ODD_VOCAB, torch.float64, torch.device("cpu"))
    student[1, 3], teacher[2, 8], student[3], teacher[3, 9] = math.nan, math.inf, -math.inf, math.nan
    mask = torch.tensor([True, False, False, False, True])
    leaf = student.clone().requires_grad_()
    stats = reference.token_stats(leaf, teacher, torch.tensor([0, -100, 7, 2, 5]), mask, 0.7, ODD_VOCAB)
    value = reference.divergence(leaf, teacher, mask, 0.7, ODD_VOCAB, "jsd", beta=0.3)
    (sum(stats) + value).sum().backward()
    for x in (*stats, value):
        assert (x[1:4] == 0).all() and x[[0, 4]].isfinite().all(), x
    assert (leaf.grad[1:4] == 0).all() and leaf.grad[[0, 4]].isfinite().all()


def test_torch_compile_as_the_first_call_in_a_process():
    """The backend's availability (which builds the C++ kernel) is settled while tracing, not a graph break."""
    script = (
        "import torch, minillm_kernels as mk\n"
        "f = torch.compile(lambda s, t: mk.fused_reverse_kld(s, t), fullgraph=True)\n"
        "s, t = torch.randn(4, 100, requires_grad=True), torch.randn(4, 100)\n"
        "f(s, t).backward()\n"
        "torch.testing.assert_close(s.grad, torch.func.grad(lambda s: mk.fused_reverse_kld(s, t, backend='reference'))(s))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# The kernels build where their toolchains are, and the CPU build is keyed by the instruction set (item 13).
# ---------------------------------------------------------------------------------------------------------------
def test_the_cpu_kernel_builds_where_a_compiler_and_ninja_are():
    """A failed build must fail here, not skip every cpu row of this file."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja: the CPU kernel cannot be built here")
    assert "cpu" in mk.available_backends(), "the CPU kernel did not build: see the RuntimeWarning for the error"


def test_the_triton_kernels_run_where_triton_is_installed():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert "triton" in mk.available_backends()
    device = device_for("triton")
    student, teacher = random_logits(2, 7, torch.float32, device), random_logits(2, 7, torch.float32, device)
    exact = exact_token_stats(student, teacher, None).reverse_kld
    got = mk.fused_reverse_kld(student, teacher, reduction="none", backend="triton")
    assert_within(got, exact, per_token_bound(exact, torch.float32), "reverse_kld")


def macros_of(march: str) -> frozenset[str]:
    """The macros the C++ compiler predefines for ``-march=<march>``."""
    done = subprocess.run([os.environ.get("CXX", "c++"), f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                          capture_output=True, text=True, check=True)
    return frozenset(line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define "))


@pytest.mark.parametrize("level", ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4"))
def test_cpu_build_is_named_and_flagged_by_its_instruction_set_level(level):
    from minillm_kernels import _build

    name, flags = _build.build_config(level)
    assert name == "minillm_kernels_cpu_" + level.replace("-", "_")
    assert f"-march={level}" in flags and not any("native" in flag for flag in flags)
    if shutil.which(os.environ.get("CXX", "c++")) is None or not macros_of("native") >= {"__x86_64__"}:
        pytest.skip("no x86-64 C++ compiler here to say which macros each level defines")
    assert _build.isa_level(macros_of(level), "x86_64") == level  # the compiler's own view of each level


def test_cpu_build_for_other_architectures_uses_the_compilers_baseline():
    from minillm_kernels import _build

    assert _build.isa_level({"__aarch64__", "__ARM_NEON"}, "aarch64") == "aarch64"
    name, flags = _build.build_config("aarch64")
    assert name == "minillm_kernels_cpu_aarch64" and not any(flag.startswith("-march") for flag in flags)


def test_a_lower_isa_level_can_be_chosen_and_a_higher_one_is_refused():
    """$MINILLM_CPU_ISA_LEVEL builds a level at or below the machine's (the AVX2 build measured on an AVX-512 machine);
    a level the machine cannot run, or any x86-64 level on another architecture, is an error naming the variable."""
    from minillm_kernels import _build

    assert _build.chosen_isa_level("x86-64-v4", None) == "x86-64-v4"
    assert _build.chosen_isa_level("x86-64-v4", "x86-64-v3") == "x86-64-v3"
    assert _build.chosen_isa_level("x86-64-v3", "x86-64-v3") == "x86-64-v3"
    for native, requested in (("x86-64-v3", "x86-64-v4"), ("aarch64", "x86-64-v3"), ("x86-64-v4", "avx2")):
        with pytest.raises(ValueError, match=f"{_build.ISA_LEVEL_ENV}={requested!r}"):
            _build.chosen_isa_level(native, requested)


def test_the_loaded_cpu_kernel_is_the_build_for_this_machine():
    require_backend("cpu")
    from minillm_kernels import _build

    level = _build.host_isa_level()
    assert _build.load_cpu_extension().__name__ == _build.build_config(level)[0]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and not os.environ.get(_build.ISA_LEVEL_ENV):  # the level against the kernel's view of the CPU
        flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split())
        has_avx512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
        assert (level == "x86-64-v4") == has_avx512, (level, has_avx512)


STALE_LOCK_BUILD = """
import sys, warnings
from pathlib import Path
from minillm_kernels._build import build_extension
warnings.simplefilter("always")
library = build_extension("minillm_stale_lock_probe", [Path(sys.argv[1])], "the probe", "nothing instead",
                          is_python_module=False)
assert library is not None
"""


def test_a_build_killed_mid_way_does_not_block_the_next_one(tmp_path):
    """torch's ``load`` waits, silently and for ever, while its ``lock`` file exists, and a build killed mid-way leaves
    it: the next build removes it, with a warning. (A library with no Python module, built in a second or two.)"""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    source = tmp_path / "probe.cpp"
    source.write_text("int minillm_stale_lock_probe() { return 1; }\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    command = [sys.executable, "-c", STALE_LOCK_BUILD, str(source)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "did not finish" not in first.stderr, first.stderr[-3000:]
    (tmp_path / "extensions" / "minillm_stale_lock_probe" / "lock").touch()  # what a killed build leaves
    try:
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the build after a killed one waited on its lock file for 30 s")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "lock, left by a build that did not finish" in second.stderr
