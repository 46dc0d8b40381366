"""Small runs of every CUDA kernel variant, for compute-sanitizer (GPU only; run by benchmarks/gpu_session.sh).

Each logits dtype x launch layout (widths around 2048 and 16384 columns) x alignment case (aligned rows, both
tensors offset by one column, student and teacher offset differently) x (target and mask, neither), forward and
backward through the extension module. Tiny shapes: under memcheck / racecheck it still takes seconds.
"""
from __future__ import annotations

import torch

from minillm_kernels.cuda import load_extension

ROWS = 9
WIDTHS = (1, 7, 1031, 2049, 16387, 20001)
COLUMN_OFFSETS = ((0, 0), (1, 1), (1, 2))  # (student, teacher): aligned, the same misalignment, different ones


def main() -> None:
    kernels = load_extension()
    if kernels is None:
        raise SystemExit("the CUDA extension did not build (see the warning above)")
    inv_temperature = 1.0 / 0.7
    runs = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for width in WIDTHS:
            for student_offset, teacher_offset in COLUMN_OFFSETS:
                student = torch.randn(ROWS, width + 2, dtype=dtype, device="cuda")[:, student_offset:][:, :width]
                teacher = torch.randn(ROWS, width + 2, dtype=dtype, device="cuda")[:, teacher_offset:][:, :width]
                target = torch.randint(0, width, (ROWS,), device="cuda")
                mask = torch.rand(ROWS, device="cuda") < 0.7
                for row_target, row_mask in ((target, mask), (None, None)):
                    kl, _, _, entropy, row_stats = kernels.forward(
                        student, teacher, row_target, row_mask, inv_temperature, width
                    )
                    upstream = torch.randn(3, ROWS, dtype=kl.dtype, device="cuda")
                    grad = kernels.backward(
                        student, teacher, row_target, row_mask, *upstream, kl, entropy, row_stats,
                        inv_temperature, width,
                    )
                    assert torch.isfinite(grad).all() and torch.isfinite(kl).all(), (dtype, width, student_offset)
                    runs += 1
    torch.cuda.synchronize()
    print(f"sanitizer_runs: {runs} forward + backward runs done")


if __name__ == "__main__":
    main()
