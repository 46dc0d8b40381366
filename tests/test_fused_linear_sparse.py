"""fused_linear_sparse_divergence against fused_sparse_divergence on the materialised logits: the student's lm_head
matmul in float64 on the CPU (soft-capped by autograd where a cap is given), then the reference backend's sparse
divergence; values and the gradients of the hidden states, weight and bias. Every divergence x tail, masks, rows with
fewer than K entries (-inf, with ids that are no column), K = 1 and K = V, temperature, reductions, chunk sizes, a
padded weight and an odd vocabulary, low-precision dtypes, the Triton backend under the interpreter on small shapes,
no [N, V] tensor ever, and the errors."""
from __future__ import annotations

import pytest
import torch

import minillm_kernels as mk
from conftest import device_for, random_mask, require_backend, tolerance
from test_fused_linear import (
    BATCH, RELATIVE_ERROR, SEQ, STUDENT_HIDDEN, VOCAB, LargestTensor, as_reference_leaves, assert_gradients_close,
    assert_relative_error, gradients, leaves, projection, unfused_logits,
)
from test_fused_linear_softcap import softcapped
from test_sparse import sparse_teacher
from minillm_kernels import reference

DIVERGENCES, TAILS = reference.DIVERGENCES, reference.SPARSE_TAILS
BETA, SKEW = 0.3, 0.2  # away from 1/2 and from each other, so that a swapped coefficient shows
K = 8
PADDING = 3  # rows of the weight past vocab_size (a padded lm_head): they get a zero gradient
FEWER = (0, 5)  # rows whose second half of entries is "no entry" (row 0: always counted by random_mask)


def sparse_case(backend, divergence, tail, reduction, chunk_size, *, dtype=torch.float64,
                logprob_dtype=torch.float64, bias=True, k=K, vocab_size=VOCAB, temperature=1.5, softcap=None,
                id_dtype=torch.int64):
    """Ours and the reference on the materialised logits: ``((loss, grads), (expected, expected_grads), mask)``, the
    gradients of sum(upstream * loss) for a random float64 upstream gradient of the loss's shape."""
    device = device_for(backend)
    student = leaves(*projection(STUDENT_HIDDEN, vocab_size + PADDING, dtype, device, bias=bias))
    ids, logprobs = (x.view(BATCH, SEQ, k).to(device) for x in sparse_teacher(
        BATCH * SEQ, vocab_size, k, torch.device("cpu"), dtype=logprob_dtype, id_dtype=id_dtype, fewer=FEWER))
    mask = random_mask(BATCH * SEQ, device).view(BATCH, SEQ)
    kwargs = dict(divergence=divergence, tail=tail, beta=BETA, skew=SKEW, mask=mask, temperature=temperature,
                  reduction=reduction, vocab_size=vocab_size)
    loss = mk.fused_linear_sparse_divergence(student[0], student[1], ids, logprobs, student_bias=student[2],
                                             student_softcap=softcap, chunk_size=chunk_size, backend=backend, **kwargs)
    upstream = torch.randn(loss.shape, dtype=torch.float64)
    grads = gradients((loss * upstream.to(loss)).sum(), student)

    ref_student, _ = as_reference_leaves(student, ())
    logits = softcapped(unfused_logits(*ref_student), softcap)
    expected = mk.fused_sparse_divergence(logits, ids.cpu(), logprobs.cpu(), backend="reference",
                                          **{**kwargs, "mask": mask.cpu()})
    expected_grads = gradients((expected * upstream).sum(), ref_student)
    return (loss, grads), (expected, expected_grads), mask


def assert_float64_match(case):
    (loss, grads), (expected, expected_grads), mask = case
    tol = tolerance(torch.float64)
    assert loss.shape == expected.shape and loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), expected, **tol)
    assert_gradients_close(grads, expected_grads, **tol)
    assert (grads[0][~mask] == 0).all()  # masked tokens: no gradient to their hidden states
    assert (grads[1][VOCAB:] == 0).all()  # the padding rows of the weight
    if loss.dim():
        assert (loss[~mask] == 0).all()


@pytest.mark.parametrize("backend", ("reference", "cpu", "cuda"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_every_divergence_and_tail_matches_the_logits_version(backend, divergence, tail):
    """float64, per token: chunks of 4 over the ~18 counted tokens, a bias, a padded weight, temperature 1.5, two
    rows with fewer than K entries."""
    require_backend(backend)
    assert_float64_match(sparse_case(backend, divergence, tail, "none", 4))


@pytest.mark.parametrize(("divergence", "tail"), (("reverse_kl", "bin"), ("jsd", "bin"), ("forward_kl", "uniform"),
                                                  ("skew_reverse_kl", "uniform"), ("tvd", "renormalized"),
                                                  ("skew_forward_kl", "renormalized")))
def test_triton_matches_the_logits_version(divergence, tail):
    """The Triton kernels (under the interpreter without a GPU: small shapes, two cases a tail), float64, reduction
    sum."""
    require_backend("triton")
    assert_float64_match(sparse_case("triton", divergence, tail, "sum", 7))


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
@pytest.mark.parametrize("chunk_size", (None, 1, 7))
def test_every_reduction_and_chunk_size(reduction, chunk_size):
    require_backend("cpu")
    assert_float64_match(sparse_case("cpu", "skew_reverse_kl", "bin", reduction, chunk_size))


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", (1, VOCAB), ids=("K=1", "K=V"))
def test_one_entry_and_the_whole_vocabulary(tail, k):
    """K = 1 (a tail of all but one column) and K = V (no tail: every mode is the dense divergence), without a bias,
    int32 ids."""
    require_backend("cpu")
    assert_float64_match(sparse_case("cpu", "jsd", tail, "none", 5, k=k, bias=False, id_dtype=torch.int32))


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("tail", TAILS)
def test_a_student_softcap(backend, tail):
    """The student's logits z ~ N(0, 9) capped at 1.5 (``_Projection``): the composition capped by autograd."""
    require_backend(backend)
    assert_float64_match(sparse_case(backend, "forward_kl", tail, "mean", 4, softcap=1.5))


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize(("divergence", "tail"), (("reverse_kl", "bin"), ("forward_kl", "uniform"),
                                                  ("jsd", "renormalized")))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_low_precision_within_the_dtype_error(backend, divergence, tail, dtype):
    """A float32 or bf16 lm_head and hidden states, float32 log-probabilities: within test_fused_linear.RELATIVE_ERROR
    of the float64 composition on the same rounded inputs, as the dense fused-linear losses (the logits are rounded
    to the weight's dtype after the matmul, the gradients are matmuls of a logit gradient rounded to it). Largest
    relative errors over 20 seeds x (reference, cpu) x these 3 cases: bf16 2.0e-3 for the values, 2.9e-2 for the
    gradients (bounds 2e-2 / 6e-2); float32 1.9e-7 / 2.7e-6 (bound 7.6e-6)."""
    require_backend(backend)
    (loss, grads), (expected, expected_grads), _ = sparse_case(backend, divergence, tail, "none", 5, dtype=dtype,
                                                               logprob_dtype=torch.float32)
    assert loss.dtype == torch.float32
    bounds = RELATIVE_ERROR[dtype]
    assert_relative_error(loss, expected, bounds["values"], "loss")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert got.dtype == dtype
        assert_relative_error(got, want, bounds["gradient"], f"grad {name}")


def test_never_materializes_the_logits():
    tokens, hidden_size, chunk, k = 256, 8, 16, 4
    student = leaves(*projection(hidden_size, VOCAB, torch.float32, "cpu", lead=(tokens,)))
    ids, logprobs = sparse_teacher(tokens, VOCAB, k, torch.device("cpu"))
    with LargestTensor() as largest:
        loss = mk.fused_linear_sparse_divergence(student[0], student[1], ids, logprobs, student_bias=student[2],
                                                 divergence="jsd", tail="uniform", chunk_size=chunk)
        loss.backward()
    # [chunk, V] buffers, the [V, H] weight gradient and the [N, H] hidden gradient: never [N, V].
    assert largest.numel == max(chunk * VOCAB, VOCAB * hidden_size, tokens * hidden_size)
    assert largest.numel * 8 < tokens * VOCAB


def test_torch_compile_traces_it_whole():
    """fullgraph=True: the chunk plan (data-dependent: the mask) is made inside the custom op; values and gradients as
    eager, with a soft cap, a mask, two tails and reductions."""
    require_backend("cpu")
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu", bias=False))[:2]
    ids, logprobs = (x.view(BATCH, SEQ, K) for x in sparse_teacher(BATCH * SEQ, VOCAB, K, torch.device("cpu")))
    mask = random_mask(BATCH * SEQ, torch.device("cpu")).view(BATCH, SEQ)

    def loss(hidden, weight):
        jsd = mk.fused_linear_sparse_divergence(hidden, weight, ids, logprobs, divergence="jsd", beta=BETA,
                                                tail="uniform", mask=mask, student_softcap=3.0, chunk_size=5,
                                                backend="cpu")
        kl = mk.fused_linear_sparse_divergence(hidden, weight, ids, logprobs, mask=mask, reduction="none",
                                               backend="cpu")
        return jsd + kl.sum()

    compiled = torch.compile(loss, fullgraph=True)(*student)
    eager = loss(*student)
    torch.testing.assert_close(compiled, eager, **tolerance(torch.float32))
    for got, want in zip(gradients(compiled, student), gradients(eager, student)):
        torch.testing.assert_close(got, want, **tolerance(torch.float32))


def test_a_fully_masked_mean_is_zero_with_zero_gradients():
    student = leaves(*projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu"))
    ids, logprobs = (x.view(BATCH, SEQ, K) for x in sparse_teacher(BATCH * SEQ, VOCAB, K, torch.device("cpu")))
    loss = mk.fused_linear_sparse_divergence(student[0], student[1], ids, logprobs, student_bias=student[2],
                                             mask=torch.zeros(BATCH, SEQ, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and all((x.grad == 0).all() for x in student)


def test_a_process_group_that_is_not_one_is_a_type_error_naming_it():
    """(A sharded lm_head itself: tests/test_parallel.py, on gloo processes.)"""
    student = projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu", bias=False)
    ids, logprobs = (x.view(BATCH, SEQ, K) for x in sparse_teacher(BATCH * SEQ, VOCAB, K, torch.device("cpu")))
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        mk.fused_linear_sparse_divergence(student[0], student[1], ids, logprobs, process_group=object())


def test_bad_arguments_are_errors_that_name_them():
    hidden, weight, _ = projection(STUDENT_HIDDEN, VOCAB, torch.float32, "cpu", bias=False)
    ids, logprobs = (x.view(BATCH, SEQ, K) for x in sparse_teacher(BATCH * SEQ, VOCAB, K, torch.device("cpu")))
    outside = ids.clone()
    outside[0, 0, 0] = VOCAB
    many = torch.arange(VOCAB + 1).expand(BATCH, SEQ, VOCAB + 1)
    cases = [
        (dict(ids=ids[:, :-1], logprobs=logprobs[:, :-1]), ValueError,
         r"with the student's leading shape \(2, 13\) \(that of student_hidden\)"),
        (dict(ids=ids.float()), TypeError, "teacher_ids must be an integer tensor"),
        (dict(logprobs=logprobs[..., :-1]), ValueError, "must have the same shape"),
        (dict(ids=outside), ValueError, r"teacher_ids must lie in \[0, vocab_size=101\)"),
        (dict(ids=many, logprobs=torch.full(many.shape, -10.0)), ValueError, "more than vocab_size = 101"),
        (dict(logprobs=torch.where(logprobs.isinf(), logprobs, -logprobs)), ValueError,
         "teacher_logprobs must be log-probabilities"),
        (dict(weight=weight[:, :-1]), ValueError, "student_weight must have shape"),
        (dict(tail="top"), ValueError, "tail must be one of"),
        (dict(divergence="kl"), ValueError, "divergence must be one of"),
        (dict(student_softcap=0.0), ValueError, "student_softcap must be"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(vocab_size=VOCAB + 1), ValueError, "vocab_size"),
    ]
    for change, error, message in cases:
        args = dict(ids=ids, logprobs=logprobs, weight=weight)
        kwargs = {key: value for key, value in change.items() if key not in args}
        args.update({key: value for key, value in change.items() if key in args})
        with pytest.raises(error, match=message):
            mk.fused_linear_sparse_divergence(hidden, args["weight"], args["ids"], args["logprobs"], **kwargs)
