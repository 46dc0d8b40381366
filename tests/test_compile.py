"""Every public loss traced whole by torch.compile(fullgraph=True): static, dynamic=True and mark_dynamic shapes, on
every backend here, the logits-level and the fused-linear functions, values and gradients equal to eager."""
from __future__ import annotations

import pytest
import torch

import minillm_kernels as mk
from conftest import ALL_BACKENDS, device_for, random_logits, random_mask, require_backend, tolerance

VOCAB = 67
HIDDEN = 8
SHAPES = ((2, 5), (3, 4))  # two leading shapes: the second call reuses a dynamic graph, or recompiles a static one


def logits_loss(backend):
    def loss(student, teacher, target, mask, temperature):
        stats = mk.fused_token_stats(student, teacher, target, mask=mask, temperature=temperature, mix_alpha=0.2,
                                     with_entropy=True, backend=backend)
        kld = mk.fused_reverse_kld(student, teacher, mask=mask, temperature=temperature, backend=backend)
        return kld + (stats.reverse_kld - stats.student_logprob + 0.5 * stats.entropy).sum()

    return loss


def linear_loss(backend):
    def loss(student, teacher, target, mask, temperature):
        (student_hidden, student_weight), (teacher_hidden, teacher_weight) = student, teacher
        stats = mk.fused_linear_token_stats(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                            mask=mask, temperature=temperature, with_entropy=True, chunk_size=4,
                                            backend=backend)
        kld = mk.fused_linear_reverse_kld(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=mask,
                                          temperature=temperature, backend=backend)
        return kld + (stats.reverse_kld - stats.student_logprob + 0.5 * stats.entropy).sum()

    return loss


def inputs(kind, lead, device):
    rows = lead[0] * lead[1]
    target = torch.randint(0, VOCAB, lead, device=device)
    mask = random_mask(rows, device).view(lead)
    if kind == "logits":
        student = random_logits(rows, VOCAB, torch.float32, device).view(*lead, VOCAB)
        teacher = random_logits(rows, VOCAB, torch.float32, device).view(*lead, VOCAB)
        return [student.requires_grad_()], [teacher], target, mask
    student = [torch.randn(*lead, HIDDEN, device=device), torch.randn(VOCAB, HIDDEN, device=device)]
    teacher = [torch.randn(*lead, HIDDEN, device=device), torch.randn(VOCAB, HIDDEN, device=device)]
    return [x.requires_grad_() for x in student], teacher, target, mask


def run(fn, kind, student, teacher, target, mask, temperature, *, mark_dynamic=False):
    leaves = [x.detach().clone().requires_grad_() for x in student]
    if mark_dynamic:  # the leading dimension of every per-token input
        for x in (leaves[0], teacher[0], target, mask):
            torch._dynamo.mark_dynamic(x, 0)
    if kind == "logits":
        loss = fn(leaves[0], teacher[0], target, mask, temperature)
    else:
        loss = fn(leaves, teacher, target, mask, temperature)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ("logits", "linear"))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dynamic", ("static", "dynamic", "mark_dynamic"))
def test_fullgraph_matches_eager(kind, backend, dynamic):
    require_backend(backend)
    device = device_for(backend)
    torch._dynamo.reset()
    eager = (logits_loss if kind == "logits" else linear_loss)(backend)
    compiled = torch.compile(eager, fullgraph=True, dynamic=True if dynamic == "dynamic" else None)
    for lead, temperature in zip(SHAPES, (1.0, 0.7)):
        student, teacher, target, mask = inputs(kind, lead, device)
        want, want_grads = run(eager, kind, student, teacher, target, mask, temperature)
        got, got_grads = run(compiled, kind, student, teacher, target, mask, temperature,
                             mark_dynamic=dynamic == "mark_dynamic")
        tol = tolerance(torch.float32)
        torch.testing.assert_close(got, want, **tol)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, **tol)


def test_a_model_and_the_fused_linear_loss_compile_together():
    """The use the fused-linear functions exist for: the student's last layers and the loss in one graph."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh())
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    teacher_hidden, teacher_weight = torch.randn(2, 5, HIDDEN), torch.randn(VOCAB, HIDDEN)
    x = torch.randn(2, 5, HIDDEN)

    def step(x):
        return mk.fused_linear_reverse_kld(body(x), lm_head.weight, teacher_hidden, teacher_weight)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        loss = fn(x)
        grads = torch.autograd.grad(loss, [*body.parameters(), lm_head.weight])
        results.append((loss.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
