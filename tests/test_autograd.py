"""The losses' gradients under every autograd API (ops/autograd.py): torch.func transforms them on every backend,
and a gradient of a fused kernel is first order, an error to differentiate again that names what is supported."""
from __future__ import annotations

import pytest
import torch

import minillm_kernels as mk
from minillm_kernels import reference
from conftest import device_for, random_logits, random_mask, require_backend

VOCAB, HIDDEN = 37, 6
BACKENDS = ("reference", "cpu", "triton", "cuda")

# Every public loss as a function of the student's logits, or of its hidden states (the lm_head weight fixed).
LOSSES = {
    "fused_reverse_kld": lambda student, teacher, mask, backend: mk.fused_reverse_kld(
        student, teacher, mask=mask, temperature=0.7, backend=backend),
    "fused_divergence jsd": lambda student, teacher, mask, backend: mk.fused_divergence(
        student, teacher, divergence="jsd", beta=0.3, mask=mask, reduction="sum", backend=backend),
    "fused_divergence tvd": lambda student, teacher, mask, backend: mk.fused_divergence(
        student, teacher, divergence="tvd", mask=mask, backend=backend),
    "fused_token_stats": lambda student, teacher, mask, backend: _token_stats_loss(mk.fused_token_stats(
        student, teacher, torch.arange(student.shape[0], device=student.device) % VOCAB, mask=mask,
        with_entropy=True, backend=backend)),
}
LINEAR_LOSSES = {
    "fused_linear_reverse_kld mean": lambda hidden, teacher, mask, backend: mk.fused_linear_reverse_kld(
        hidden, *teacher[:1], *teacher[1:], mask=mask, chunk_size=3, backend=backend),
    "fused_linear_reverse_kld none": lambda hidden, teacher, mask, backend: mk.fused_linear_reverse_kld(
        hidden, *teacher[:1], *teacher[1:], mask=mask, reduction="none", chunk_size=3, backend=backend).sum(),
    "fused_linear_divergence skew_reverse_kl": lambda hidden, teacher, mask, backend: mk.fused_linear_divergence(
        hidden, *teacher[:1], *teacher[1:], divergence="skew_reverse_kl", mask=mask, chunk_size=3, backend=backend),
    "fused_linear_token_stats": lambda hidden, teacher, mask, backend: _token_stats_loss(mk.fused_linear_token_stats(
        hidden, *teacher[:1], *teacher[1:], torch.arange(hidden.shape[0], device=hidden.device) % VOCAB, mask=mask,
        with_entropy=True, chunk_size=3, backend=backend)),
}


def _token_stats_loss(stats):
    return (stats.reverse_kld - 0.5 * stats.student_logprob + 0.25 * stats.entropy).sum()


def case(name, backend):
    """``(loss of one tensor, that tensor)``: the logits, or the hidden states before a fixed student lm_head."""
    require_backend(backend)
    device, rows = device_for(backend), 5
    mask = random_mask(rows, device)
    if name in LOSSES:
        student, teacher = (random_logits(rows, VOCAB, torch.float64, device) for _ in range(2))
        return (lambda x: LOSSES[name](x, teacher, mask, backend)), student
    student_weight = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, device=device)
    teacher = (student_weight, torch.randn(rows, HIDDEN + 1, dtype=torch.float64, device=device),
               torch.randn(VOCAB, HIDDEN + 1, dtype=torch.float64, device=device))
    return (lambda x: LINEAR_LOSSES[name](x, teacher, mask, backend)), \
        torch.randn(rows, HIDDEN, dtype=torch.float64, device=device)


def autograd_gradient(loss, x):
    leaf = x.clone().requires_grad_()
    return torch.autograd.grad(loss(leaf), leaf)[0]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (vmap's fallback: the ops run per batch element)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", (*LOSSES, *LINEAR_LOSSES))
def test_torch_func_grad_vjp_and_jacrev_give_the_autograd_gradient(name, backend):
    loss, x = case(name, backend)
    want = autograd_gradient(loss, x)
    torch.testing.assert_close(torch.func.grad(loss)(x), want, rtol=1e-12, atol=1e-14)
    value, vjp = torch.func.vjp(loss, x)
    torch.testing.assert_close(value, loss(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vjp(torch.ones_like(value))[0], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.func.jacrev(loss)(x), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", (*LOSSES, *LINEAR_LOSSES))
def test_differentiating_a_kernels_gradient_again_is_a_clear_error(name, backend):
    """create_graph=True gives a gradient with a graph (first-order uses of it work), whose backward raises an error
    naming what is supported and where higher orders are (reference.py's formulas); so do nested torch.func.grad and
    forward mode. On every backend: the reference backend's kernels, too, give their gradient in closed form."""
    loss, x = case(name, backend)
    leaf = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    torch.testing.assert_close(gradient.detach(), autograd_gradient(loss, x), rtol=0, atol=0)
    assert gradient.requires_grad
    first_order = (r"gradients are first order: backward, torch.autograd.grad and torch.func.grad .* "
                   r"minillm_kernels\.reference")
    with pytest.raises(RuntimeError, match=first_order):
        torch.autograd.grad((gradient * gradient).sum(), leaf)
    with pytest.raises(RuntimeError, match=first_order):
        torch.func.grad(lambda y: torch.func.grad(loss)(y).square().sum())(x)
    with pytest.raises((RuntimeError, NotImplementedError), match="jvp function .* forward mode AD"):  # (torch's)
        torch.func.jvp(loss, (x,), (torch.ones_like(x),))


def test_the_naive_formulas_differentiate_to_any_order():
    """Where the first-order error sends a user: reference.py's formulas are plain PyTorch, whose gradients have
    gradients (a Hessian-vector product, finite and not 0)."""
    mask = random_mask(5, torch.device("cpu"))
    student, teacher = (random_logits(5, VOCAB, torch.float64, torch.device("cpu")) for _ in range(2))
    for loss in (lambda x: reference.divergence(x, teacher, mask, 0.7, VOCAB, "jsd", beta=0.3).sum(),
                 lambda x: sum(reference.token_stats(x, teacher, torch.arange(5) % VOCAB, mask, 0.7, VOCAB)).sum()):
        leaf = student.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
        (second,) = torch.autograd.grad((gradient * gradient).sum(), leaf)
        assert second.isfinite().all() and (second != 0).any()
