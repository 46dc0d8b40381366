"""Every public loss traced whole by torch.compile(fullgraph=True): static, dynamic=True and mark_dynamic shapes, on
every backend here, the logits-level and the fused-linear functions (the divergence family's too; soft caps), values and
gradients equal to eager; and a bad beta or skew is eager's ValueError, also where it is symbolic."""
from __future__ import annotations

import math

import pytest
import torch

import minillm_kernels as mk
from conftest import ALL_BACKENDS, device_for, random_logits, random_mask, require_backend, tolerance

VOCAB = 67
HIDDEN = 8
SHAPES = ((2, 5), (3, 4))  # two leading shapes: the second call reuses a dynamic graph, or recompiles a static one


def require_compiled_backend(backend: str, *, interpreted: bool = True) -> None:
    """``require_backend``, and the reference rows, and the Triton rows without a GPU (its interpreter), only where
    ``interpreted``: the kernels are one set of custom ops whatever the backend (an argument of each op), so the
    traced graph is the cpu rows' with another backend string; one row per test shows that the string reaches those
    kernels, the others would repeat the cpu rows at several times their cost."""
    require_backend(backend)
    if backend == "reference" and not interpreted:
        pytest.skip("the reference rows' graph is the cpu rows': once per test")
    if backend == "triton" and not torch.cuda.is_available() and not interpreted:
        pytest.skip("the Triton rows' graph is the cpu rows': interpreted once per test, every variant on a GPU")


def logits_loss(backend):
    def loss(student, teacher, target, mask, temperature):
        stats = mk.fused_token_stats(student, teacher, target, mask=mask, temperature=temperature, mix_alpha=0.2,
                                     with_entropy=True, backend=backend)
        kld = mk.fused_reverse_kld(student, teacher, mask=mask, temperature=temperature, backend=backend)
        jsd = mk.fused_divergence(student, teacher, divergence="jsd", beta=0.3, mask=mask, temperature=temperature,
                                  backend=backend)
        skew = mk.fused_divergence(student, teacher, divergence="skew_reverse_kl", skew=0.2, mask=mask,
                                   temperature=temperature, reduction="none", backend=backend)
        return kld + jsd + skew.sum() + (stats.reverse_kld - stats.student_logprob + 0.5 * stats.entropy).sum()

    return loss


def linear_loss(backend):
    def loss(student, teacher, target, mask, temperature):
        (student_hidden, student_weight), (teacher_hidden, teacher_weight) = student, teacher
        stats = mk.fused_linear_token_stats(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                            mask=mask, temperature=temperature, with_entropy=True, chunk_size=4,
                                            backend=backend)
        kld = mk.fused_linear_reverse_kld(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=mask,
                                          temperature=temperature, student_softcap=3.0, backend=backend)
        tvd = mk.fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                         divergence="tvd", mask=mask, temperature=temperature, chunk_size=4,
                                         backend=backend)
        jsd = mk.fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                         divergence="jsd", beta=0.7, mask=mask, temperature=temperature,
                                         student_softcap=2.5, teacher_softcap=4.0, reduction="none", backend=backend)
        return kld + tvd + jsd.sum() + (stats.reverse_kld - stats.student_logprob + 0.5 * stats.entropy).sum()

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
    require_compiled_backend(backend, interpreted=dynamic == "dynamic")
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


def divergence_call(kind, backend, argument):
    """A loss of (inputs, value of ``argument``): the JSD's beta or the skew reverse KL's skew, the logits-level or the
    fused-linear function, with the inputs it takes."""
    divergence = "jsd" if argument == "beta" else "skew_reverse_kl"
    device = device_for(backend)
    if kind == "logits":
        inputs = [random_logits(6, VOCAB, torch.float32, device) for _ in range(2)]
        return (lambda x, value: mk.fused_divergence(*x, divergence=divergence, backend=backend,
                                                     **{argument: value})), inputs
    inputs = [torch.randn(6, HIDDEN, device=device), torch.randn(VOCAB, HIDDEN, device=device)] * 2
    return (lambda x, value: mk.fused_linear_divergence(*x, divergence=divergence, chunk_size=4, backend=backend,
                                                       **{argument: value})), inputs


def assert_eager_value_error(compiled, loss, inputs, bad):
    with pytest.raises(ValueError) as eager:
        loss(inputs, bad)
    with pytest.raises(ValueError) as traced:
        compiled(inputs, bad)
    assert str(traced.value) == str(eager.value)


@pytest.mark.parametrize("argument", ("beta", "skew"))
@pytest.mark.parametrize("kind", ("logits", "linear"))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_bad_symbolic_beta_or_skew_is_the_eager_value_error(backend, kind, argument):
    """With dynamic=True, beta (skew) is symbolic after two good values: out of range or NaN it is the ValueError eager
    mode gives, raised when the graph runs (a failing check cannot raise while tracing: the ops check it again); a
    0-dim tensor (whose value the graph has only when it runs) is refused by name, never a guard error."""
    require_compiled_backend(backend, interpreted=kind == "logits" and argument == "beta")
    torch._dynamo.reset()
    loss, inputs = divergence_call(kind, backend, argument)
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for good in (0.3, 0.4):
        torch.testing.assert_close(compiled(inputs, good), loss(inputs, good), **tolerance(torch.float32))
    for bad in (1.5, math.nan):
        assert_eager_value_error(compiled, loss, inputs, bad)
    with pytest.raises(Exception, match=rf"{argument} is a 0-dim tensor.*pass a Python number") as tensor:
        compiled(inputs, torch.tensor(0.3))
    assert "guard" not in str(tensor.value)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_bad_constant_beta_is_the_eager_value_error(backend):
    """Without dynamic shapes the value is a constant of the graph, and the same ValueError."""
    require_compiled_backend(backend)
    torch._dynamo.reset()
    loss, inputs = divergence_call("logits", backend, "beta")
    assert_eager_value_error(torch.compile(loss, fullgraph=True), loss, inputs, 1.5)
