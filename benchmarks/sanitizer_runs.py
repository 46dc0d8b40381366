"""Small runs of every CUDA kernel variant, for compute-sanitizer (GPU only; run by benchmarks/gpu_session.sh).

The reverse KL's kernels (``forward`` / ``backward``):
Rows: each (student, teacher) dtype pair of one dtype, and a bf16 student with a float32 teacher (vectors of 4
columns, 8 bytes of one and 16 of the other) x launch layout (widths around 2048 and 16384 columns) x alignment
case (aligned rows, both tensors offset by one column, student and teacher offset differently) x (target and
mask, neither). Strided: the same launch layouts on ``[B, N, V]`` views laid out in two levels of row strides, as
the ops hand them over (``row_view``): both models' ``[:, -(N+1):-1]`` slices, and a transposed student with a
stride-0 expanded teacher, aligned and offset, in float32 and in the mixed pair. Forward and backward through the
extension module. The divergence family's (``divergence_forward`` / ``divergence_backward``): each divergence x a
float32 and the mixed pair x a width below one block, one a few columns past 2048 and one of several blocks x aligned
and differently offset rows, with a mask. Tiny shapes: under memcheck / racecheck it still takes seconds.
"""
from __future__ import annotations

import torch

from minillm_kernels._build import load_cuda_extension as load_extension
from minillm_kernels.backends import row_view
from minillm_kernels.ops.divergence import KERNEL_DIVERGENCES

BATCH, RESPONSE = 3, 3
ROWS = BATCH * RESPONSE
WIDTHS = (1, 7, 1031, 2049, 16387, 20001)
STRIDED_WIDTHS = (7, 2049, 20001)  # one per launch layout
COLUMN_OFFSETS = ((0, 0), (1, 1), (1, 2))  # (student, teacher): aligned, the same misalignment, different ones
STRIDED_COLUMN_OFFSETS = ((0, 0), (1, 2))
MIXED = (torch.bfloat16, torch.float32)  # (student, teacher)
DTYPE_PAIRS = tuple((dtype, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)) + (MIXED,)
STRIDED_DTYPE_PAIRS = ((torch.float32, torch.float32), MIXED)
STRIDED_LAYOUTS = (("response_slice", "response_slice"), ("transposed", "expanded"))  # (student, teacher)
DIVERGENCE_WIDTHS = (7, 2049, 20001)
DIVERGENCE_COEFFICIENT = 0.3  # beta (JSD) or skew (skew KLs); unused by the forward KL and the TVD


def logits(layout: str, width: int, column_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """``[BATCH, RESPONSE, width]`` random logits on the GPU, laid out as ``layout`` says, their columns starting
    ``column_offset`` elements into rows of width + 2."""
    def columns(x: torch.Tensor) -> torch.Tensor:
        return x[..., column_offset:][..., :width]

    if layout == "rows":
        return columns(torch.randn(ROWS, width + 2, dtype=dtype, device="cuda")).view(BATCH, RESPONSE, width)
    if layout == "response_slice":  # logits[:, -(N+1):-1] of [B, L, V]
        return columns(torch.randn(BATCH, RESPONSE + 2, width + 2, dtype=dtype, device="cuda")[:, -(RESPONSE + 1):-1])
    if layout == "transposed":  # [T, B, V] seen as [B, T, V]
        return columns(torch.randn(RESPONSE, BATCH, width + 2, dtype=dtype, device="cuda").transpose(0, 1))
    if layout == "expanded":  # one sequence over the batch: stride 0
        return columns(torch.randn(1, RESPONSE, width + 2, dtype=dtype, device="cuda")).expand(BATCH, RESPONSE, width)
    raise ValueError(layout)


def cases():
    """``(student layout, teacher layout, width, (student, teacher) column offsets, (student, teacher) dtypes)``."""
    for dtypes in DTYPE_PAIRS:
        for width in WIDTHS:
            for offsets in COLUMN_OFFSETS:
                yield "rows", "rows", width, offsets, dtypes
    for dtypes in STRIDED_DTYPE_PAIRS:
        for student_layout, teacher_layout in STRIDED_LAYOUTS:
            for width in STRIDED_WIDTHS:
                for offsets in STRIDED_COLUMN_OFFSETS:
                    yield student_layout, teacher_layout, width, offsets, dtypes


def divergence_cases():
    """``(divergence, width, (student, teacher) column offsets, (student, teacher) dtypes)``."""
    for divergence in KERNEL_DIVERGENCES:
        for dtypes in STRIDED_DTYPE_PAIRS:
            for width in DIVERGENCE_WIDTHS:
                for offsets in STRIDED_COLUMN_OFFSETS:
                    yield divergence, width, offsets, dtypes


def run_divergences(kernels, inv_temperature: float) -> int:
    """Forward and backward of each of ``divergence_cases``; the number of runs."""
    runs = 0
    for divergence, width, (student_offset, teacher_offset), (student_dtype, teacher_dtype) in divergence_cases():
        student = row_view(logits("rows", width, student_offset, student_dtype))
        teacher = row_view(logits("rows", width, teacher_offset, teacher_dtype))
        mask = torch.rand(ROWS, device="cuda") < 0.7
        value, mean_partial, row_stats = kernels.divergence_forward(
            student, teacher, mask, divergence, DIVERGENCE_COEFFICIENT, inv_temperature, width)
        grad = kernels.divergence_backward(student, teacher, mask, torch.randn_like(value), mean_partial, row_stats,
                                           divergence, DIVERGENCE_COEFFICIENT, inv_temperature, width)
        case = (divergence, width, student_offset, teacher_offset, student_dtype, teacher_dtype)
        assert torch.isfinite(grad).all() and torch.isfinite(value).all(), case
        runs += 1
    return runs


def main() -> None:
    kernels = load_extension()
    if kernels is None:
        raise SystemExit("the CUDA extension did not build (see the warning above)")
    inv_temperature = 1.0 / 0.7
    runs = run_divergences(kernels, inv_temperature)
    for student_layout, teacher_layout, width, (student_offset, teacher_offset), (student_dtype, teacher_dtype) in cases():
        student = row_view(logits(student_layout, width, student_offset, student_dtype))
        teacher = row_view(logits(teacher_layout, width, teacher_offset, teacher_dtype))
        target = torch.randint(0, width, (ROWS,), device="cuda")
        mask = torch.rand(ROWS, device="cuda") < 0.7
        for row_target, row_mask in ((target, mask), (None, None)):
            kl, _, _, entropy, row_stats = kernels.forward(student, teacher, row_target, row_mask, inv_temperature, width)
            upstream = torch.randn(3, ROWS, dtype=kl.dtype, device="cuda")
            grad = kernels.backward(
                student, teacher, row_target, row_mask, *upstream, kl, entropy, row_stats, inv_temperature, width,
            )
            case = (student_layout, teacher_layout, width, student_offset, student_dtype, teacher_dtype)
            assert torch.isfinite(grad).all() and torch.isfinite(kl).all(), case
            runs += 1
    torch.cuda.synchronize()
    print(f"sanitizer_runs: {runs} forward + backward runs done (the divergence family's first)")


if __name__ == "__main__":
    main()
