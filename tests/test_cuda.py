"""The CUDA C++ backend on a GPU, beyond what ``test_reverse_kld.py`` checks for every backend.

``test_reverse_kld.py`` already runs "cuda" against the float64 oracle (dtypes and dtype pairs, temperatures, masks,
padding, -inf, extreme logits, out-of-range targets, NaN, non-contiguous inputs, torch.compile, float32 accuracy at
4096 x 32000). Here, calling the extension module directly: agreement with the Triton kernels (row statistics
included) and the oracle at widths around each launch layout; every output element written (outputs pre-filled with
NaN); rows whose pointers are not aligned to a vector, for dtype pairs of equal and of different element sizes;
N * V > 2^31 at 16384 x 151936 bf16, contiguous and as a [:, -(N+1):-1] slice (sampled rows against the oracle).
Skipped without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

import minillm_kernels as mk
from conftest import (
    accumulation_dtype,
    assert_gradient_within,
    assert_within,
    exact_token_stats,
    per_token_bound,
    random_logits,
    random_mask,
    require_backend,
)
from minillm_kernels.ops import reverse_kld_triton
from minillm_kernels.backends import row_view

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the 'cuda' backend is built and run only there"
)

DEVICE = torch.device("cuda")
STAT_NAMES = ("kl", "student_logprob", "teacher_logprob", "entropy", "row_stats")
# Widths around the kernels' launch layouts (one warp per row up to 2048 columns, a 256-thread block up to
# 16384, a 512-thread block above) and vector tails (8 bf16 / fp16 or 4 fp32 columns per 16-byte vector).
WIDTHS = (1, 7, 1031, 2048, 2049, 16384, 16387, 50257)
ROWS = 11  # more than the 8 rows of a one-warp-per-row block, and not a multiple of it
TEMPERATURE = 0.7
LARGE_ROWS, LARGE_VOCAB = 16384, 151936  # 2.5e9 elements: row offsets pass 2^31


@pytest.fixture(scope="module")
def cuda_kernels():
    require_backend("cuda")
    from minillm_kernels._build import load_cuda_extension as load_extension

    return load_extension()


def test_the_extension_builds_where_the_cuda_toolkit_is():
    """A build failure on a GPU machine with nvcc is a failure, not a skip of every test below."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit (CUDA_HOME) on this GPU machine: the extension cannot be built here")
    from minillm_kernels._build import load_cuda_extension as load_extension

    assert load_extension() is not None, "the CUDA extension did not build: see the RuntimeWarning for the error"


def make_inputs(rows, width, dtype, *, teacher_width=None, teacher_dtype=None, with_target=True, with_mask=True):
    """Student [rows, width], teacher [rows, teacher_width], target, mask, vocab_size and upstream (a, b, c), on the
    GPU."""
    teacher_width = teacher_width or width
    vocab_size = min(width, teacher_width)
    student = random_logits(rows, width, dtype, DEVICE)
    teacher = random_logits(rows, teacher_width, teacher_dtype or dtype, DEVICE)
    target = torch.randint(0, vocab_size, (rows,), device=DEVICE) if with_target else None
    mask = random_mask(rows, DEVICE) if with_mask else None
    if with_target and with_mask:
        target[~mask] = -100  # masked rows may hold ignore ids
    upstream = torch.randn(3, rows, device=DEVICE)  # a = dL/dKL, b = dL/dlog q(y), c = dL/dH
    return student, teacher, target, mask, vocab_size, upstream


def run_kernels(kernels, student, teacher, target, mask, vocab_size, upstream):
    """The module's forward outputs and backward gradient (of the student's shape) for ``[..., V]`` logits, handed
    over as the ops do (``row_view``)."""
    inv_temperature = 1.0 / TEMPERATURE
    student_rows, teacher_rows = row_view(student), row_view(teacher)
    outputs = kernels.forward(student_rows, teacher_rows, target, mask, inv_temperature, vocab_size)
    kl, _, _, entropy, row_stats = outputs
    upstream = upstream.to(kl.dtype)
    grad = kernels.backward(
        student_rows, teacher_rows, target, mask, *upstream, kl, entropy, row_stats, inv_temperature, vocab_size
    )
    return tuple(outputs), grad.view(student.shape)


def assert_matches_the_oracle(outputs, grad, student, teacher, target, mask, vocab_size, upstream):
    """(kl, student_logprob, teacher_logprob, entropy) within the per-token bound of the float64 oracle, the gradient
    within its rounding bound."""
    exact = exact_token_stats(student, teacher, target, upstream, mask=mask, temperature=TEMPERATURE,
                              vocab_size=vocab_size)
    acc = accumulation_dtype(student.dtype, teacher.dtype)
    for name, got in zip(STAT_NAMES[:4], outputs):
        want = getattr(exact, {"kl": "reverse_kld"}.get(name, name))
        assert_within(got, want, per_token_bound(want, acc), name)
    assert_gradient_within(grad, exact, acc)


def assert_same_row_stats(got, want, acc_dtype):
    """Row statistics of two kernels: the centres (raw row maxima) equal, the log Z's within the per-token bound."""
    assert torch.equal(got[:, [0, 2]], want[:, [0, 2]]), "row maxima differ"
    log_z = want[:, [1, 3]].cpu().double()
    assert_within(got[:, [1, 3]], log_z, per_token_bound(log_z, acc_dtype), "row_stats log Z")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("width", WIDTHS)
def test_cuda_matches_triton_and_the_oracle(cuda_kernels, dtype, width):
    inputs = make_inputs(ROWS, width, dtype)
    outputs, grad = run_kernels(cuda_kernels, *inputs)
    triton_outputs, triton_grad = run_kernels(reverse_kld_triton, *inputs)
    for name, got, want in zip(STAT_NAMES, outputs, triton_outputs):
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, name
    assert_same_row_stats(outputs[4], triton_outputs[4], torch.float32)
    assert grad.dtype == dtype and grad.shape == inputs[0].shape and grad.is_contiguous()
    assert_matches_the_oracle(outputs, grad, *inputs)
    assert_matches_the_oracle(triton_outputs, triton_grad, *inputs)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("width", (7, 1031, 4099, 50257))
@pytest.mark.parametrize("with_target, with_mask", ((True, True), (False, False), (True, False)))
def test_every_output_element_is_written(cuda_kernels, dtype, width, with_target, with_mask):
    """Outputs pre-filled with NaN come back finite and equal to freshly allocated ones; padding and masked rows 0."""
    student, teacher, target, mask, vocab_size, upstream = make_inputs(
        ROWS, width + 5, dtype, teacher_width=width, with_target=with_target, with_mask=with_mask
    )
    inv_temperature = 1.0 / TEMPERATURE
    stats_dtype = torch.promote_types(dtype, torch.float32)
    upstream = upstream.to(stats_dtype)
    poisoned = [torch.full((ROWS,), math.nan, dtype=stats_dtype, device=DEVICE) for _ in range(4)]
    poisoned.append(torch.full((ROWS, 4), math.nan, dtype=stats_dtype, device=DEVICE))
    student, teacher = row_view(student), row_view(teacher)
    cuda_kernels.forward_out(student, teacher, target, mask, inv_temperature, vocab_size, *poisoned)
    fresh = cuda_kernels.forward(student, teacher, target, mask, inv_temperature, vocab_size)
    for name, got, want in zip(STAT_NAMES, poisoned, fresh):
        assert torch.isfinite(got).all(), f"{name}: elements left unwritten (NaN)"
        assert torch.equal(got, want), name
    kl, _, _, entropy, row_stats = fresh
    if mask is not None:
        assert all((x[~mask] == 0).all() for x in fresh)
    if target is None:
        assert (fresh[1] == 0).all() and (fresh[2] == 0).all()

    grad = torch.full((ROWS, width + 5), math.nan, dtype=dtype, device=DEVICE)
    backward_args = (student, teacher, target, mask, *upstream, kl, entropy, row_stats, inv_temperature, vocab_size)
    cuda_kernels.backward_out(*backward_args, grad)
    assert torch.isfinite(grad).all(), "gradient elements left unwritten (NaN)"
    assert torch.equal(grad, cuda_kernels.backward(*backward_args))
    assert (grad[:, vocab_size:] == 0).all()
    if mask is not None:
        assert (grad[~mask] == 0).all()


def unaligned_case(case, rows, width, dtype, teacher_dtype):
    """Student [rows, width] (dtype) and teacher (teacher_dtype) whose row pointers are not all aligned to a vector, in
    the way `case` says."""
    def logits(cols, of_dtype):
        return random_logits(rows, cols, of_dtype, DEVICE)

    if case == "odd_width":  # rows of an odd width: each row starts at another offset, the same column in both
        return logits(width | 1, dtype), logits(width | 1, teacher_dtype)
    if case == "same_column_offset":  # [:, 1:]: head columns before the first aligned one, then vectors
        return logits(width + 1, dtype)[:, 1:], logits(width + 1, teacher_dtype)[:, 1:]
    if case == "different_column_offsets":  # offsets 1 and 2: no common alignment, every column one by one
        return logits(width + 1, dtype)[:, 1:], logits(width + 2, teacher_dtype)[:, 2:]
    if case == "different_row_strides":  # the teacher's rows drift against the student's
        return logits(width, dtype), logits(width + 3, teacher_dtype)[:, :width]
    if case == "storage_offset":  # a base pointer one element past a 16-byte boundary
        flat = random_logits(1, rows * width + 1, dtype, DEVICE).view(-1)
        return flat[1:].view(rows, width), logits(width, teacher_dtype)
    raise ValueError(case)


# Equal element sizes (vectors of 16 bytes in both), and different ones (a bf16 student with a float32 teacher: vectors
# of 4 columns, 8 bytes of the student and 16 of the teacher; and the other way round).
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float32, torch.bfloat16))


@pytest.mark.parametrize("dtype, teacher_dtype", DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("width", (1031, 20001))
@pytest.mark.parametrize(
    "case", ("odd_width", "same_column_offset", "different_column_offsets", "different_row_strides", "storage_offset")
)
def test_unaligned_rows_match_the_oracle(cuda_kernels, case, width, dtype, teacher_dtype):
    student, teacher = unaligned_case(case, ROWS, width, dtype, teacher_dtype)
    width = student.shape[1]
    target = torch.randint(0, width, (ROWS,), device=DEVICE)
    mask = random_mask(ROWS, DEVICE)
    upstream = torch.randn(3, ROWS, device=DEVICE)
    inputs = (student, teacher, target, mask, width, upstream)
    outputs, grad = run_kernels(cuda_kernels, *inputs)
    assert_matches_the_oracle(outputs, grad, *inputs)
    contiguous = (student.contiguous(), teacher.contiguous(), target, mask, width, upstream)
    contiguous_outputs, contiguous_grad = run_kernels(cuda_kernels, *contiguous)
    assert_same_row_stats(outputs[4], contiguous_outputs[4], accumulation_dtype(dtype, teacher_dtype))
    assert_matches_the_oracle(contiguous_outputs, contiguous_grad, *contiguous)


@pytest.mark.parametrize("layout", ("contiguous", "response_slice"))
def test_more_than_2_to_the_31_elements(cuda_kernels, layout):
    """16384 x 151936 bf16 (Qwen2.5's vocabulary), as contiguous rows and as the [:, -(N+1):-1] slice of [8, 2049, V]
    logits (two levels of row strides): every output written; sampled rows, past 2^31, exact."""
    rows, vocab, batch = LARGE_ROWS, LARGE_VOCAB, 8
    assert rows * vocab > 2**31

    def logits():
        if layout == "contiguous":
            return torch.empty(rows, vocab, dtype=torch.bfloat16, device=DEVICE).normal_(0.0, 3.0)
        response = rows // batch
        base = torch.empty(batch, response + 1, vocab, dtype=torch.bfloat16, device=DEVICE).normal_(0.0, 3.0)
        return base[:, -(response + 1):-1]

    student, teacher = logits(), logits()
    target = torch.randint(0, vocab, (rows,), device=DEVICE)
    mask = torch.rand(rows, device=DEVICE) < 0.9
    mask[-1] = True
    upstream = torch.randn(3, rows, device=DEVICE)
    inv_temperature = 1.0 / TEMPERATURE
    outputs = cuda_kernels.forward(row_view(student), row_view(teacher), target, mask, inv_temperature, vocab)
    kl, _, _, entropy, row_stats = outputs
    assert all(torch.isfinite(x).all() for x in outputs)
    grad = torch.full((rows, vocab), math.nan, dtype=torch.bfloat16, device=DEVICE)
    cuda_kernels.backward_out(row_view(student), row_view(teacher), target, mask, *upstream, kl, entropy, row_stats,
                              inv_temperature, vocab, grad)
    assert torch.isfinite(grad).all(), "gradient elements left unwritten (NaN)"
    assert (grad[~mask] == 0).all()

    first_past_2_31 = 2**31 // vocab + 1  # the first contiguous row that starts past element 2^31
    sampled = torch.randperm(rows, device=DEVICE)[:16].tolist() + [first_past_2_31 - 1, first_past_2_31, rows - 1]
    index = torch.tensor(sorted(set(sampled)), device=DEVICE)
    lead_index = torch.unravel_index(index, student.shape[:-1])  # the sampled rows, without a copy of the logits
    sampled_outputs = tuple(x[index] for x in outputs)
    assert_matches_the_oracle(sampled_outputs, grad[index], student[lead_index], teacher[lead_index], target[index],
                              mask[index], vocab, upstream[:, index])


def test_auto_picks_the_measured_faster_gpu_kernel_on_cuda_tensors():
    from minillm_kernels import backends

    available = mk.available_backends()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        faster = backends.faster_gpu_backend(dtype, LARGE_VOCAB)  # "triton" while no table is committed
        expected = next(name for name in (faster, "triton", "cuda", "reference") if name in available)
        assert backends.choose_backend("auto", DEVICE, dtype, LARGE_VOCAB) == expected
