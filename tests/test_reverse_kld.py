"""Every backend against the float64 reference: values, gradients, masks, padding, extreme inputs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import minillm_kernels as mk
from conftest import (
    ALL_BACKENDS,
    KERNEL_BACKENDS,
    device_for,
    random_logits,
    random_mask,
    require_backend,
    tolerance,
)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
ODD_VOCAB = 1031  # not a multiple of any block size


def stats_and_gradient(backend, student, teacher, target, upstream, **kwargs):
    """TokenStats and d/d(student) of sum(a KL + b log q(y) + c H) with upstream (a, b, c)."""
    student = student.detach().clone().requires_grad_()
    stats = mk.fused_token_stats(student, teacher, target, with_entropy=True, backend=backend, **kwargs)
    a, b, c = (u.to(student.device, stats.reverse_kld.dtype) for u in upstream)
    loss = (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum()
    (grad,) = torch.autograd.grad(loss, student)
    return stats, grad


def reference_of(student, teacher, target, upstream, **kwargs):
    """The reference in float64 on the same (already rounded) inputs, on the CPU."""
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    kwargs = {k: cpu(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return stats_and_gradient(
        "reference", student.cpu().double(), teacher.cpu().double(), cpu(target), upstream, **kwargs
    )


def assert_stats_close(stats, expected, backend, dtype):
    tol = tolerance(backend, dtype)
    for name in mk.TokenStats._fields:
        got, want = getattr(stats, name), getattr(expected, name)
        torch.testing.assert_close(got.cpu().double(), want, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 2.0))
def test_token_stats_and_gradient_match_reference(backend, dtype, temperature):
    require_backend(backend)
    device = device_for(backend)
    rows = 7
    student = random_logits(rows, ODD_VOCAB, dtype, device)
    teacher = random_logits(rows, ODD_VOCAB, dtype, device)
    target = torch.randint(0, ODD_VOCAB, (rows,), device=device)
    mask = random_mask(rows, device)
    target[~mask] = -100  # ignored ids where masked must be accepted
    upstream = torch.randn(3, rows, dtype=torch.float64)
    kwargs = dict(mask=mask, temperature=temperature, mix_alpha=0.2)
    stats, grad = stats_and_gradient(backend, student, teacher, target, upstream, **kwargs)
    expected, expected_grad = reference_of(student, teacher, target, upstream, **kwargs)
    assert_stats_close(stats, expected, backend, dtype)
    assert grad.dtype == dtype and grad.shape == student.shape
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **tolerance(backend, dtype, gradient=True))
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_reverse_kld_reductions_with_upstream_gradient(backend, reduction):
    require_backend(backend)
    device = device_for(backend)
    batch, seq = 2, 5
    student = random_logits(batch * seq, ODD_VOCAB, torch.float32, device).view(batch, seq, ODD_VOCAB)
    teacher = random_logits(batch * seq, ODD_VOCAB, torch.float32, device).view(batch, seq, ODD_VOCAB)
    mask = random_mask(batch * seq, device).view(batch, seq)

    def loss_and_grad(backend, student, teacher, mask):
        student = student.detach().clone().requires_grad_()
        loss = mk.fused_reverse_kld(student, teacher, mask=mask, reduction=reduction, backend=backend)
        upstream = torch.linspace(-1.5, 2.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
        (grad,) = torch.autograd.grad(loss, student, upstream)
        return loss, grad

    loss, grad = loss_and_grad(backend, student, teacher, mask)
    expected, expected_grad = loss_and_grad("reference", student.cpu().double(), teacher.cpu().double(), mask.cpu())
    assert loss.shape == expected.shape == ((batch, seq) if reduction == "none" else ())
    tol = tolerance(backend, torch.float32)
    torch.testing.assert_close(loss.cpu().double(), expected, **tol)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **tol)
    if reduction == "none":
        assert (loss[~mask] == 0).all()


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
    stats, grad = stats_and_gradient(backend, student, teacher, target, upstream, vocab_size=vocab)
    expected, expected_grad = reference_of(
        student[:, :vocab], teacher[:, :vocab], target, upstream, vocab_size=vocab
    )
    assert_stats_close(stats, expected, backend, torch.float32)
    assert (grad[:, vocab:] == 0).all()
    torch.testing.assert_close(grad[:, :vocab].cpu().double(), expected_grad, **tolerance(backend, torch.float32))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_extreme_logits_as_accurate_as_naive_float32(backend):
    """|logits| ~ 1e4 in float32: the error against float64 stays within 4x the naive float32 loss's error."""
    require_backend(backend)
    device = device_for(backend)
    rows = 6
    student = random_logits(rows, ODD_VOCAB, torch.float32, device, scale=1e4)
    teacher = random_logits(rows, ODD_VOCAB, torch.float32, device, scale=1e4)
    teacher[1] = student[1] + 1e4  # a shifted copy: KL = 0 up to rounding
    target = torch.randint(0, ODD_VOCAB, (rows,), device=device)
    upstream = torch.randn(3, rows, dtype=torch.float64)
    stats, grad = stats_and_gradient(backend, student, teacher, target, upstream)
    naive, naive_grad = stats_and_gradient("reference", student.cpu(), teacher.cpu(), target.cpu(), upstream)
    exact, exact_grad = reference_of(student, teacher, target, upstream)
    for name in ("reverse_kld", "student_logprob", "teacher_logprob", "entropy"):
        error = (getattr(stats, name).cpu().double() - getattr(exact, name)).abs().max()
        naive_error = (getattr(naive, name).double() - getattr(exact, name)).abs().max()
        assert error <= 4 * naive_error + 1e-3, f"{name}: error {error} vs naive float32 {naive_error}"
    error = (grad.cpu().double() - exact_grad).abs().max()
    naive_error = (naive_grad.double() - exact_grad).abs().max()
    assert error <= 4 * naive_error + 1e-5, f"gradient: error {error} vs naive float32 {naive_error}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
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
    stats, grad = stats_and_gradient(backend, student, teacher, target, upstream, mix_alpha=0.2)
    expected, expected_grad = reference_of(student, teacher, target, upstream, mix_alpha=0.2)
    assert all(torch.isfinite(x).all() for x in stats)
    assert_stats_close(stats, expected, backend, dtype)
    assert (grad[:, both + student_only] == 0).all()
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **tolerance(backend, dtype, gradient=True))


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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend):
    require_backend(backend)
    device = device_for(backend)
    batch, seq = 3, 4
    # [seq, batch, V] transposed to [batch, seq, V], and a column slice: neither is contiguous.
    student = random_logits(seq * batch, ODD_VOCAB + 8, torch.float32, device).view(seq, batch, -1).transpose(0, 1)
    teacher = random_logits(seq * batch, ODD_VOCAB, torch.float32, device).view(seq, batch, -1).transpose(0, 1)
    student = student[..., :ODD_VOCAB]
    target = torch.randint(0, ODD_VOCAB, (seq, batch), device=device).t()
    assert not student.is_contiguous() and not teacher.is_contiguous() and not target.is_contiguous()
    upstream = torch.randn(3, batch, seq, dtype=torch.float64)
    stats, grad = stats_and_gradient(backend, student, teacher, target, upstream)
    expected, expected_grad = reference_of(
        student.contiguous(), teacher.contiguous(), target.contiguous(), upstream
    )
    assert_stats_close(stats, expected, backend, torch.float32)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **tolerance(backend, torch.float32))


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
def test_torch_compile_fullgraph_matches_eager(backend):
    require_backend(backend)
    device = device_for(backend)

    def loss_fn(student, teacher, mask):
        return 0.5 * mk.fused_reverse_kld(student, teacher, mask=mask, temperature=2.0, backend=backend)

    student = random_logits(6, ODD_VOCAB, torch.float32, device)
    teacher = random_logits(6, ODD_VOCAB, torch.float32, device)
    mask = random_mask(6, device)
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        leaf = student.clone().requires_grad_()
        loss = fn(leaf, teacher, mask)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


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
    from minillm_kernels import dispatch

    assert dispatch._choose_backend("auto", torch.device("cpu")) == "cpu"


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
