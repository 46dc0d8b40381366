"""fused_linear_reverse_kld / fused_linear_token_stats against the unfused composition: the lm_head matmuls
in float64 on the CPU, then the reference loss; values and the gradients of hidden states, weight and bias."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minillm_kernels as mk
from conftest import ALL_BACKENDS, device_for, random_mask, require_backend, tolerance
from minillm_kernels import linear

BATCH, SEQ = 2, 13  # 26 tokens: chunks of 7 (or of 4 over the ~18 counted ones) do not divide them
STUDENT_HIDDEN, TEACHER_HIDDEN = 16, 24
VOCAB = 101  # odd: not a multiple of any block size
# Low-precision inputs against the float64 composition on the same (rounded) inputs: bounds on the relative error
# ||got - want|| / ||want|| of each tensor, for the least precise dtype among the inputs. The logits are rounded to
# the weights' dtype after the matmul, and the gradients are matmuls of a logit gradient rounded to the student's
# dtype, as in the unfused composition in those dtypes, whose errors ours matched (bf16, 20 seeds: the same to
# within 10%). bf16, measured: largest over 60 seeds x (cpu, reference) 0.008 for the values, 0.025 for the
# gradients (those of weight and bias under random upstream gradients of both signs, where the sum over tokens
# cancels). fp16 has 3 more mantissa bits: the bf16 bounds / 8 (largest measured over 20 seeds of every pair:
# 0.0022 / 0.0036). float32: the rounding of the inputs is gone and what is left is the accumulation in float32,
# 64 ulps (largest measured: 3.4e-7 / 1.1e-6).
RELATIVE_ERROR = {
    torch.bfloat16: dict(values=2e-2, gradient=6e-2),
    torch.float16: dict(values=2e-2 / 8, gradient=6e-2 / 8),
    torch.float32: dict(values=64 * 2.0**-23, gradient=64 * 2.0**-23),
}
PRECISION_ORDER = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # least precise first

def projection(hidden_size, vocab, dtype, device, *, bias=True, lead=(BATCH, SEQ)):
    """(hidden [..., H], weight [vocab, H], bias [vocab] or None), logits ~ N(0, 9) like conftest's random_logits."""
    hidden = torch.randn(*lead, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) * (3.0 / hidden_size**0.5)
    bias_ = torch.randn(vocab, dtype=torch.float64) if bias else None
    return tuple(None if x is None else x.to(dtype).to(device) for x in (hidden, weight, bias_))


def leaves(*tensors):
    return tuple(None if x is None else x.detach().clone().requires_grad_() for x in tensors)


def unfused_logits(hidden, weight, bias):
    """The composition the fused functions replace, in float64 on the CPU."""
    logits = hidden.cpu().double() @ weight.cpu().double().t()
    return logits if bias is None else logits + bias.cpu().double()


def as_reference_leaves(student, teacher):
    """float64 CPU copies of the student's (hidden, weight, bias), requiring grad, and the teacher's."""
    student = leaves(*(None if x is None else x.detach().cpu().double() for x in student))
    teacher = tuple(None if x is None else x.detach().cpu().double() for x in teacher)
    return student, teacher


def gradients(loss, student):
    wanted = [x for x in student if x is not None]
    grads = iter(torch.autograd.grad(loss, wanted))
    return tuple(None if x is None else next(grads) for x in student)


def assert_gradients_close(got, want, **tol):
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g.cpu().double(), w, **tol, msg=lambda m: f"grad {name}: {m}")


def reverse_kld_case(backend, dtype, reduction, chunk_size, *, vocab_size=VOCAB, teacher_vocab=VOCAB + 3,
                     temperature=1.5):
    """Ours and the unfused reference: (loss, grads) each, with a random upstream gradient."""
    device = device_for(backend)
    student = leaves(*projection(STUDENT_HIDDEN, vocab_size, dtype, device))
    teacher = projection(TEACHER_HIDDEN, teacher_vocab, dtype, device)
    mask = random_mask(BATCH * SEQ, device).view(BATCH, SEQ)
    kwargs = dict(mask=mask, temperature=temperature, reduction=reduction, vocab_size=vocab_size)
    loss = mk.fused_linear_reverse_kld(
        student[0], student[1], teacher[0], teacher[1], student_bias=student[2], teacher_bias=teacher[2],
        chunk_size=chunk_size, backend=backend, **kwargs,
    )
    upstream = torch.randn(loss.shape, dtype=torch.float64)
    grads = gradients((loss * upstream.to(loss)).sum(), student)

    ref_student, ref_teacher = as_reference_leaves(student, teacher)
    expected = mk.fused_reverse_kld(
        unfused_logits(*ref_student), unfused_logits(*ref_teacher), backend="reference",
        **{**kwargs, "mask": mask.cpu()},
    )
    expected_grads = gradients((expected * upstream).sum(), ref_student)
    return (loss, grads), (expected, expected_grads), mask


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_reverse_kld_matches_unfused_composition(backend, reduction):
    require_backend(backend)
    (loss, grads), (expected, expected_grads), mask = reverse_kld_case(backend, torch.float64, reduction, 4)
    tol = tolerance(torch.float64)
    assert loss.shape == expected.shape and loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), expected, **tol)
    assert_gradients_close(grads, expected_grads, **tol)
    assert (grads[0][~mask] == 0).all()  # masked tokens: no gradient to their hidden states
    if reduction == "none":
        assert (loss[~mask] == 0).all()


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("chunk_size", (None, 1, 7, 1000))
def test_any_chunk_size_gives_the_same_result(backend, chunk_size):
    require_backend(backend)
    for reduction in ("mean", "none"):  # the two designs: gradient in the forward / recomputed in the backward
        (loss, grads), (expected, expected_grads), _ = reverse_kld_case(
            backend, torch.float64, reduction, chunk_size
        )
        torch.testing.assert_close(loss, expected, **tolerance(torch.float64))
        assert_gradients_close(grads, expected_grads, **tolerance(torch.float64))


def token_stats_case(backend, dtype, *, chunk_size=4, vocab_size=VOCAB, student_vocab=VOCAB + 5, bias=True,
                     teacher_dtype=None, hidden_dtypes=(None, None)):
    """Ours and the unfused float64 composition on the same (rounded) inputs: (stats, grads) each. ``dtype`` is the
    student's, ``teacher_dtype`` the teacher's (default: the same); ``hidden_dtypes`` the hidden states' of each
    model where they differ from its weights'."""
    device = device_for(backend)
    student = projection(STUDENT_HIDDEN, student_vocab, dtype, device, bias=bias)
    teacher = projection(TEACHER_HIDDEN, vocab_size, teacher_dtype or dtype, device, bias=bias)
    student, teacher = ((x[0] if h is None else x[0].to(h), *x[1:]) for x, h in zip((student, teacher), hidden_dtypes))
    student = leaves(*student)
    mask = random_mask(BATCH * SEQ, device).view(BATCH, SEQ)
    target = torch.randint(0, vocab_size, (BATCH, SEQ), device=device).masked_fill(~mask, -100)
    kwargs = dict(mask=mask, temperature=0.7, mix_alpha=0.2, weight_clip=(0.5, 1.5), with_entropy=True,
                  vocab_size=vocab_size)
    stats = mk.fused_linear_token_stats(
        student[0], student[1], teacher[0], teacher[1], target, student_bias=student[2], teacher_bias=teacher[2],
        chunk_size=chunk_size, backend=backend, **kwargs,
    )
    upstream = torch.randn(3, BATCH, SEQ, dtype=torch.float64)

    def loss(stats, upstream):
        a, b, c = upstream
        return (a * stats.reverse_kld + b * stats.student_logprob + c * stats.entropy).sum()

    grads = gradients(loss(stats, upstream.to(device, stats.reverse_kld.dtype)), student)
    ref_student, ref_teacher = as_reference_leaves(student, teacher)
    expected = mk.fused_token_stats(
        unfused_logits(*ref_student), unfused_logits(*ref_teacher), target.cpu(), backend="reference",
        **{**kwargs, "mask": mask.cpu()},
    )
    return (stats, grads), (expected, gradients(loss(expected, upstream), ref_student)), mask


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_token_stats_match_unfused_composition(backend):
    require_backend(backend)
    (stats, grads), (expected, expected_grads), mask = token_stats_case(backend, torch.float64)
    tol = tolerance(torch.float64)
    for name in mk.TokenStats._fields:
        torch.testing.assert_close(getattr(stats, name).cpu(), getattr(expected, name), **tol,
                                   msg=lambda m: f"{name}: {m}")
    assert_gradients_close(grads, expected_grads, **tol)
    assert (grads[1][VOCAB:] == 0).all()  # the student's padding rows past vocab_size
    assert not stats.teacher_logprob.requires_grad and not stats.importance_weight.requires_grad
    assert (stats.importance_weight[~mask] == 0).all() and (stats.reverse_kld[~mask] == 0).all()


def assert_relative_error(got, want, bound, name, absolute=0.0):
    """||got - want|| <= bound ||want|| + absolute (Frobenius norms; ``absolute``: a derived allowance on top)."""
    difference, norm = (got.cpu().double() - want).norm().item(), want.norm().item()
    allowed = f"{bound}" + (f" + {absolute / norm:.4f}" if absolute else "")
    assert difference <= bound * norm + absolute, f"{name}: relative error {difference / norm:.4f} > {allowed}"


FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("student_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("teacher_dtype", FLOAT_DTYPES)
def test_any_pair_of_dtypes(backend, student_dtype, teacher_dtype):
    """Every (student, teacher) dtype pair: each model's matmul in its weight's dtype, the kernels reading each
    model's logits in their own dtype, no cast of either weight; against the float64 composition."""
    require_backend(backend)
    (stats, grads), (expected, expected_grads), _ = token_stats_case(backend, student_dtype,
                                                                     teacher_dtype=teacher_dtype)
    stats_dtype = torch.float64 if torch.float64 in (student_dtype, teacher_dtype) else torch.float32
    assert stats.reverse_kld.dtype == stats_dtype and all(g.dtype == student_dtype for g in grads)
    assert_within_dtype_error(stats, grads, expected, expected_grads, (student_dtype, teacher_dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("hidden_dtypes", ((torch.float32, None), (None, torch.bfloat16), (torch.float64, torch.float32)))
def test_hidden_states_in_another_dtype_than_the_weight(backend, hidden_dtypes):
    """Hidden states in another dtype than their lm_head weight (e.g. from an autocast region) are cast chunk by
    chunk to the weight's dtype; the hidden states' gradient comes back in their own dtype."""
    require_backend(backend)
    weights = (torch.bfloat16, torch.float32)
    (stats, grads), (expected, expected_grads), _ = token_stats_case(backend, weights[0], teacher_dtype=weights[1],
                                                                     hidden_dtypes=hidden_dtypes)
    assert grads[0].dtype == (hidden_dtypes[0] or weights[0]) and grads[1].dtype == weights[0]
    assert_within_dtype_error(stats, grads, expected, expected_grads, (*weights, *hidden_dtypes))


def assert_within_dtype_error(stats, grads, expected, expected_grads, dtypes):
    """Within RELATIVE_ERROR of the least precise of ``dtypes``; float64 everywhere: the float64 tolerance."""
    least = next(d for d in PRECISION_ORDER if d in dtypes)
    for name in ("reverse_kld", "student_logprob", "teacher_logprob", "entropy"):
        got, want = getattr(stats, name), getattr(expected, name)
        if least == torch.float64:
            torch.testing.assert_close(got.cpu(), want, **tolerance(torch.float64))
        else:
            assert_relative_error(got, want, RELATIVE_ERROR[least]["values"], name)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, expected_grads):
        if least == torch.float64:
            torch.testing.assert_close(got.cpu(), want, **tolerance(torch.float64))
        else:
            assert_relative_error(got, want, RELATIVE_ERROR[least]["gradient"], f"grad {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bf16_mean_reverse_kld(backend):
    """The forward-time gradient design in bf16."""
    require_backend(backend)
    (loss, grads), (expected, expected_grads), _ = reverse_kld_case(backend, torch.bfloat16, "mean", 4)
    assert_relative_error(loss, expected, RELATIVE_ERROR[torch.bfloat16]["values"], "mean reverse KL")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert_relative_error(got, want, RELATIVE_ERROR[torch.bfloat16]["gradient"], f"grad {name}")


@pytest.mark.filterwarnings("ignore:teacher_hidden requires grad")  # tested on its own below
def test_without_biases_and_with_a_frozen_weight():
    student_hidden, student_weight, _ = projection(STUDENT_HIDDEN, VOCAB, torch.float64, "cpu", bias=False)
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float64, "cpu", bias=False)
    student_hidden.requires_grad_()
    teacher[0].requires_grad_()  # a teacher that was not detached still gets no gradient
    for reduction in ("sum", "none"):
        loss = mk.fused_linear_reverse_kld(student_hidden, student_weight, teacher[0], teacher[1],
                                           reduction=reduction, chunk_size=5)
        loss.sum().backward()
        expected_hidden = student_hidden.detach().clone().requires_grad_()
        expected = mk.fused_reverse_kld(expected_hidden @ student_weight.t(), teacher[0].detach() @ teacher[1].t(),
                                        reduction=reduction, backend="reference")
        expected.sum().backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(student_hidden.grad, expected_hidden.grad, rtol=1e-9, atol=1e-10)
        assert teacher[0].grad is None
        student_hidden.grad = None


def test_scalar_loss_backward_twice_with_retained_graph():
    """The forward-time gradients are scaled by the upstream scalar and survive a retained graph."""
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float64, "cpu"))
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float64, "cpu")
    loss = mk.fused_linear_reverse_kld(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                       teacher_bias=teacher[2], chunk_size=6)
    (0.5 * loss).backward(retain_graph=True)
    once = [x.grad.clone() for x in student]
    loss.backward()
    for x, g in zip(student, once):
        torch.testing.assert_close(x.grad, 3 * g)


@pytest.mark.parametrize("divergence", ("reverse_kl", "jsd"))
@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_the_gradients_returned_are_not_the_ones_saved_for_the_next_backward(reduction, divergence):
    """With a retained graph, what the caller does to one backward's gradients (``.data.zero_()``, zeroing ``.grad``
    in place between steps) changes nothing in the next: each backward returns fresh tensors, even for an upstream
    gradient of 1 (where scaling the stored gradients would be a no-op). The reverse KL's op and the divergence
    family's (both compute the gradients in the forward)."""
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float64, "cpu"))
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float64, "cpu")
    loss = mk.fused_linear_divergence(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                      divergence=divergence, reduction=reduction, chunk_size=6)
    first = torch.autograd.grad(loss, student, retain_graph=True)
    want = [g.clone() for g in first]
    for g in first:
        g.data.zero_()
    for got, expected in zip(torch.autograd.grad(loss, student, retain_graph=True), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    loss.backward(retain_graph=True)
    for x in student:
        x.grad.zero_()  # (optimizer.zero_grad(set_to_none=False))
    loss.backward()
    for x, expected in zip(student, want):
        torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_mean_over_fully_masked_input_is_zero_with_zero_gradient(backend):
    require_backend(backend)
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu"))
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    loss = mk.fused_linear_reverse_kld(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                       mask=mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert all((x.grad == 0).all() for x in student)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_autocast_leaves_the_matmuls_in_the_input_dtype(reduction):
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu"))
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    upstream = torch.randn(BATCH, SEQ) if reduction == "none" else torch.randn(())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mk.fused_linear_reverse_kld(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                           teacher_bias=teacher[2], reduction=reduction, chunk_size=5)
    grads = gradients((loss * upstream).sum(), student)
    ref_student, ref_teacher = as_reference_leaves(student, teacher)
    expected = mk.fused_reverse_kld(unfused_logits(*ref_student), unfused_logits(*ref_teacher), reduction=reduction)
    torch.testing.assert_close(loss.double(), expected, **tolerance(torch.float32))
    assert_gradients_close(grads, gradients((expected * upstream.double()).sum(), ref_student),
                           **tolerance(torch.float32))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation (our custom ops included) produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


@pytest.mark.parametrize("op", ("reverse_kld", "token_stats"))
def test_never_materializes_the_logits(op):
    tokens, hidden_size, chunk = 256, 8, 16
    student = leaves(*projection(hidden_size, VOCAB, torch.float32, "cpu", lead=(tokens,)))
    teacher = projection(hidden_size, VOCAB, torch.float32, "cpu", lead=(tokens,))
    target = torch.randint(0, VOCAB, (tokens,))
    with LargestTensor() as largest:
        if op == "reverse_kld":
            loss = mk.fused_linear_reverse_kld(student[0], student[1], teacher[0], teacher[1], chunk_size=chunk)
        else:
            stats = mk.fused_linear_token_stats(student[0], student[1], teacher[0], teacher[1], target,
                                                chunk_size=chunk, with_entropy=True)
            loss = (stats.reverse_kld + stats.student_logprob + stats.entropy).mean()
        loss.backward()
    # [chunk, V] buffers, the [V, H] weight gradient and the [N, H] hidden gradient: never [N, V].
    assert largest.numel == max(chunk * VOCAB, VOCAB * hidden_size, tokens * hidden_size)
    assert largest.numel * 8 < tokens * VOCAB


def test_default_chunk_size_fills_the_budget_in_equal_chunks():
    vocab, element_bytes = 32000, 4
    per_token = 3 * vocab * element_bytes
    limit = linear.CHUNK_BYTES_CPU // per_token
    for tokens in (1, limit, limit + 1, 10 * limit + 3):
        size = linear.default_chunk_size(tokens, vocab, torch.float32, torch.device("cpu"))
        n_chunks = -(-tokens // size)
        assert size <= limit and size * per_token <= linear.CHUNK_BYTES_CPU
        assert n_chunks == -(-tokens // limit)  # no more chunks than the budget needs, of sizes within one
        assert size * (n_chunks - 1) < tokens <= size * n_chunks
    assert linear.default_chunk_size(10, 10**9, torch.float32, torch.device("cpu")) == 1


def call(**overrides):
    student = projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu")
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    args = dict(student_hidden=student[0], student_weight=student[1], teacher_hidden=teacher[0],
                teacher_weight=teacher[1], student_bias=student[2], teacher_bias=teacher[2],
                target_ids=torch.randint(0, VOCAB, (BATCH, SEQ)), backend="reference")
    args.update(overrides)
    return mk.fused_linear_token_stats(**args)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(student_weight=torch.randn(VOCAB, STUDENT_HIDDEN + 1)), ValueError,
         r"student_weight must have shape \[V, H\] .* H = student_hidden.shape\[-1\] = 16"),
        (dict(teacher_weight=torch.randn(VOCAB * TEACHER_HIDDEN)), ValueError, r"teacher_weight must have shape \[V, H\]"),
        (dict(student_bias=torch.randn(VOCAB + 1)), ValueError, r"student_bias must have shape \[V\] = \(101,\)"),
        (dict(teacher_hidden=torch.randn(BATCH, SEQ + 1, TEACHER_HIDDEN)), ValueError,
         "must agree on every dimension but the last"),
        (dict(student_hidden=torch.randint(0, 3, (BATCH, SEQ, STUDENT_HIDDEN))), TypeError,
         "student_hidden must be a floating-point tensor"),
        (dict(student_weight="lm_head"), TypeError, "student_weight must be a tensor"),
        (dict(student_weight=torch.empty(VOCAB, STUDENT_HIDDEN, device="meta")), ValueError,
         "student_weight is on meta but student_hidden is on cpu"),
        (dict(teacher_weight=torch.randn(VOCAB + 2, TEACHER_HIDDEN), teacher_bias=None), ValueError,
         "student_weight has 101 vocab entries and teacher_weight 103; pass vocab_size"),
        (dict(vocab_size=VOCAB + 1), ValueError, "vocab_size must be an int in"),
        (dict(chunk_size=0), ValueError, r"chunk_size \(tokens per chunk, or None\) must be an int in \[1, inf\]"),
        (dict(chunk_size=2.5), TypeError, "chunk_size .* must be an int, got float"),
        (dict(mask=torch.ones(BATCH, SEQ + 1, dtype=torch.bool)), ValueError,
         "mask must have the hidden states' leading shape"),
        (dict(target_ids=torch.full((BATCH, SEQ), VOCAB)), ValueError, "target_ids must lie in"),
        (dict(target_ids=None), TypeError, "target_ids must be a tensor"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(mix_alpha=-0.1), ValueError, "mix_alpha"),
        (dict(backend="tpu"), ValueError, "backend must be 'auto' or one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_unknown_reduction():
    student = projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu")
    with pytest.raises(ValueError, match="reduction must be one of"):
        mk.fused_linear_reverse_kld(student[0], student[1], student[0], student[1], reduction="avg")


def test_benchmark_variants_compute_the_same_loss():
    """benchmarks/variants.py's linear_reverse_kld variants (ours per backend, Liger's where installed) agree
    with its matmul + naive loss."""
    from benchmarks.variants import inputs, variants

    table = variants("linear_reverse_kld", "cpu")
    args, _ = inputs("linear_reverse_kld", 64, 300, 32, torch.float32, "cpu")
    want = table["naive"](*args)
    fused = [name for name in table if not name.startswith("naive")]
    assert fused, table
    for name in fused:
        torch.testing.assert_close(table[name](*args), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_a_weight_changed_in_place_before_the_backward_is_an_error(reduction):
    """As for any op: autograd's version check, not the gradient of the old weight."""
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu"))
    teacher = projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu")
    loss = mk.fused_linear_reverse_kld(student[0], student[1], teacher[0], teacher[1], student_bias=student[2],
                                       reduction=reduction)
    with torch.no_grad():
        student[1].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_meta_tensors_give_the_outputs_shapes(backend):
    """Meta tensors (shape inference, e.g. a model built on the meta device) get meta outputs of the right shapes
    and dtypes; the cpu backend refuses them by name (tests/test_validation.py)."""
    require_backend(backend)
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    student_hidden = meta(BATCH, SEQ, STUDENT_HIDDEN).requires_grad_()
    student_weight = meta(VOCAB, STUDENT_HIDDEN, dtype=torch.float32).requires_grad_()
    teacher = (meta(BATCH, SEQ, TEACHER_HIDDEN), meta(VOCAB, TEACHER_HIDDEN))
    target = torch.zeros(BATCH, SEQ, dtype=torch.long, device="meta")
    stats = mk.fused_linear_token_stats(student_hidden, student_weight, *teacher, target, with_entropy=True,
                                        backend=backend)
    assert all(x.shape == (BATCH, SEQ) and x.dtype == torch.float32 and x.is_meta for x in stats)
    loss = mk.fused_linear_reverse_kld(student_hidden, student_weight, *teacher, backend=backend)
    assert loss.shape == () and loss.is_meta
    (stats.reverse_kld.sum() + loss).backward()
    assert student_hidden.grad.shape == student_hidden.shape and student_weight.grad.dtype == torch.float32


def test_a_teacher_that_requires_grad_is_warned_about_once_and_gets_none(monkeypatch):
    from minillm_kernels import validation

    monkeypatch.setattr(validation, "_warned_about_teacher_grad", False)
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu"))
    teacher = leaves(*projection(TEACHER_HIDDEN, VOCAB, torch.float32, "cpu"))
    target = torch.randint(0, VOCAB, (BATCH, SEQ))
    with pytest.warns(UserWarning, match=r"teacher_hidden requires grad.*torch.no_grad\(\)"):
        stats = mk.fused_linear_token_stats(student[0], student[1], teacher[0], teacher[1], target)
    assert not stats.teacher_logprob.requires_grad and not stats.log_ratio.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        mk.fused_linear_reverse_kld(student[0], student[1], teacher[0], teacher[1]).backward()
    assert all(x.grad is None for x in teacher if x is not None)
