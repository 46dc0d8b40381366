"""Shared fixtures: fresh random logits each run, backends, devices and per-dtype tolerances."""
from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, on CPU tensors. It must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import minillm_kernels as mk  # noqa: E402

KERNEL_BACKENDS = ("cpu", "triton", "cuda")
ALL_BACKENDS = ("reference", *KERNEL_BACKENDS)


def require_backend(backend: str) -> None:
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend!r} is not available here (available: {mk.available_backends()})")


def device_for(backend: str) -> torch.device:
    """Where a backend's tensors live in the tests: CUDA for GPU backends when there is a GPU."""
    on_gpu = backend in ("triton", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def accumulates_in_float64(backend: str, dtype: torch.dtype) -> bool:
    """The reference and the C++ CPU and CUDA kernels keep float64 logits in float64; Triton uses float32."""
    return dtype == torch.float64 and backend in ("reference", "cpu", "cuda")


def tolerance(backend: str, dtype: torch.dtype, *, gradient: bool = False) -> dict[str, float]:
    """rtol/atol against the float64 reference on the same (rounded) inputs.

    Per-token values are computed in float32 (or float64) whatever the input dtype, so they share the
    float32 tolerance; a gradient is stored in the logits' dtype, so it carries that dtype's rounding.
    """
    if accumulates_in_float64(backend, dtype):
        return dict(rtol=1e-9, atol=1e-10)
    if gradient and dtype == torch.bfloat16:
        return dict(rtol=1.6e-2, atol=1e-4)
    if gradient and dtype == torch.float16:
        return dict(rtol=2e-3, atol=1e-5)
    return dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A new seed per test, printed so that a failure can be replayed."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


def random_logits(rows: int, width: int, dtype: torch.dtype, device: torch.device, scale: float = 3.0) -> torch.Tensor:
    """Logits ~ N(0, scale^2) in ``dtype``: a peaked but not degenerate softmax."""
    return (torch.randn(rows, width, dtype=torch.float64) * scale).to(dtype).to(device)


def random_mask(rows: int, device: torch.device) -> torch.Tensor:
    """A mask with at least one True and one False."""
    mask = torch.rand(rows) < 0.7
    mask[0], mask[-1] = True, False
    return mask.to(device)
