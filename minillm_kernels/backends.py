"""The backends, one object each, and the choice of the backend a call runs on.

=============  ===================================================  ==========================
backend        its kernels                                          tensors
=============  ===================================================  ==========================
"reference"    the naive PyTorch formulas (``reference.py``) in     any device, any float dtype
               the kernels' shape (``ops/reference_kernels.py``)
"cpu"          the fused C++ kernels (``csrc/cpu``), built on       CPU
               first use with ninja (``_build.py``)
"triton"       the Triton kernels (``ops/*_triton.py``)             CUDA; CPU under
                                                                    ``TRITON_INTERPRET=1``
"cuda"         the CUDA C++ kernels (``csrc/cuda``), built on first  CUDA
               use with ninja and nvcc for the device's capability
=============  ===================================================  ==========================

Every backend has the same kernels (``Kernels``: a forward and a backward per family, the signatures of the custom
ops of ``ops/``), which the ops look up by the backend's name (``kernels``), and ``usable()``: whether it runs here.
The kernels take each model's rows as a ``[n_outer, rows_per_outer, V]`` view (``row_view``: the leading dimensions'
strides as they are) and compute in ``compute_dtype`` of the inputs' dtypes.

``backend="auto"`` (``choose_backend``) picks "cpu" for CPU tensors. For CUDA tensors it picks, per logits dtype and
vocabulary size, the faster of "triton" and "cuda" as measured on a GPU and recorded in ``gpu_backend_choice.json``
beside this file (``load_gpu_backend_choice``), and "triton" where that file is absent or has no rule for the case.
Where the chosen backend is not usable it falls back to the other GPU kernel, then to "reference".
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Optional

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# What every backend's kernels take and give.
# ---------------------------------------------------------------------------------------------------------------
class Kernels(NamedTuple):
    """One backend's kernels: the forward and backward of each family, named as the custom ops that call them
    (``ops/reverse_kld.py``, ``ops/divergence.py``, ``ops/sparse.py``, whose docstrings give the signatures)."""

    token_stats: Callable
    token_stats_backward: Callable
    divergence: Callable
    divergence_backward: Callable
    sparse_divergence: Callable
    sparse_divergence_backward: Callable


def compute_dtype(*logits_dtypes: torch.dtype) -> torch.dtype:
    """promote(*logits_dtypes, float32): float64 if any is float64, else float32. Every backend computes in it (the
    reference's log-softmaxes, the kernels' per-element arithmetic), and the per-row outputs have it."""
    dtype = torch.float32
    for logits_dtype in logits_dtypes:
        dtype = torch.promote_types(dtype, logits_dtype)
    return dtype


def n_rows(logits: Tensor) -> int:
    """N: the product of the leading dimensions of ``[..., V]`` logits."""
    return math.prod(logits.shape[:-1])


def _row_levels(logits: Tensor) -> list[tuple[int, int]]:
    """The leading dimensions of ``logits`` as ``(size, stride)`` levels, outermost first: size-1 dimensions dropped,
    and each dimension merged into the one before it where their strides chain (outer stride = size * stride)."""
    levels: list[tuple[int, int]] = []
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]):
        if size == 1:
            continue
        if levels and levels[-1][1] == size * stride:
            levels[-1] = (levels[-1][0] * size, stride)
        else:
            levels.append((size, stride))
    return levels


def row_view(logits: Tensor) -> Tensor:
    """``[..., V]`` logits (last-dimension stride 1) as the kernels take them: a ``[n_outer, rows_per_outer, V]``
    view with strides ``(outer_stride, inner_stride, 1)`` whose rows, in order, are the logits' rows, so that row r
    starts ``(r // rows_per_outer) * outer_stride + (r % rows_per_outer) * inner_stride`` elements past the first.
    No copy, unless the leading dimensions do not coalesce into two levels (``_row_levels``): then a contiguous
    copy of the rows (as ``[1, N, V]``)."""
    width = logits.shape[-1]
    levels = _row_levels(logits)
    if len(levels) > 2:
        return logits.reshape(1, -1, width)  # (not a view: reshape copies)
    (n_outer, outer_stride), (rows_per_outer, inner_stride) = [(1, 0)] * (2 - len(levels)) + levels
    return logits.as_strided((n_outer, rows_per_outer, width), (outer_stride, inner_stride, 1))


def fresh_gradient(student: Tensor) -> Tensor:
    """An uninitialised gradient of ``student``'s shape, contiguous (``new_empty``, unlike ``empty_like`` of a
    strided tensor), in its dtype: what every backward op returns."""
    return student.new_empty(student.shape)


# ---------------------------------------------------------------------------------------------------------------
# The backends.
# ---------------------------------------------------------------------------------------------------------------
def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Backend:
    """A backend: ``usable()`` (whether it runs on this machine), ``check_device`` (whether it takes tensors on a
    device) and ``kernels()``, loaded on first use.

    ``runs_here`` answers ``usable`` (the first call for "cpu" or "cuda" builds that kernel), ``takes`` whether a
    device's tensors can be given to it (``device_error`` says which, with ``{device}`` for the device given),
    ``load`` gives its ``Kernels``.
    """

    def __init__(self, name: str, *, runs_here: Callable[[], bool], takes: Callable[[torch.device], bool],
                 device_error: str, load: Callable[[], Kernels]) -> None:
        self.name, self.device_error = name, device_error
        self._runs_here, self._takes, self._load = runs_here, takes, load
        self._kernels: Optional[Kernels] = None

    def usable(self) -> bool:
        """Whether this backend runs here (``backend_usable``: answered once, then cached)."""
        return backend_usable(self.name)

    def check_device(self, device: torch.device) -> None:
        """A ValueError unless this backend takes tensors on ``device``."""
        if not self._takes(device):
            raise ValueError(self.device_error.format(device=device))

    def kernels(self) -> Kernels:
        if self._kernels is None:
            self._kernels = self._load()
        return self._kernels


def _reference_kernels() -> Kernels:
    from minillm_kernels.ops import reference_kernels as k

    return Kernels(k.token_stats, k.token_stats_backward, k.divergence, k.divergence_backward,
                   k.sparse_divergence, k.sparse_divergence_backward)


def _extension_kernels(extension) -> Kernels:
    """The kernels of a C++ extension (``csrc/cpu`` and ``csrc/cuda`` bind the same names)."""
    return Kernels(extension.forward, extension.backward, extension.divergence_forward,
                   extension.divergence_backward, extension.sparse_divergence_forward,
                   extension.sparse_divergence_backward)


def _cpu_extension():
    from minillm_kernels._build import load_cpu_extension

    return load_cpu_extension()


def _cuda_extension():
    from minillm_kernels._build import load_cuda_extension

    return load_cuda_extension()


def _triton_kernels() -> Kernels:
    from minillm_kernels.ops import divergence_triton, reverse_kld_triton, sparse_triton

    return Kernels(reverse_kld_triton.forward, reverse_kld_triton.backward, divergence_triton.forward,
                   divergence_triton.backward, sparse_triton.forward, sparse_triton.backward)


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", runs_here=lambda: True, takes=lambda device: True, device_error="",
                         load=_reference_kernels),
    "cpu": Backend("cpu", runs_here=lambda: _cpu_extension() is not None, takes=lambda device: device.type == "cpu",
                   device_error="backend 'cpu' runs on CPU tensors, but the logits are on {device}",
                   load=lambda: _extension_kernels(_cpu_extension())),
    "triton": Backend(
        "triton",
        runs_here=lambda: importlib.util.find_spec("triton") is not None and (
            torch.cuda.is_available() or _interpreting_triton()),
        takes=lambda device: device.type == "cuda" or _interpreting_triton(),
        device_error="backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), the logits are on {device}",
        load=_triton_kernels),
    "cuda": Backend("cuda", runs_here=lambda: torch.cuda.is_available() and _cuda_extension() is not None,
                    takes=lambda device: device.type == "cuda",
                    device_error="backend 'cuda' needs CUDA tensors, the logits are on {device}",
                    load=lambda: _extension_kernels(_cuda_extension())),
}

_usable: dict[str, bool] = {}  # filled one backend at a time, on first use


@torch.compiler.assume_constant_result  # while tracing, run eagerly and take the answer as a constant
def backend_usable(name: str) -> bool:
    """Whether backend ``name`` runs here. The first call for "cpu" or "cuda" builds that kernel (then cached),
    and only that backend's: asking for "reference" builds nothing."""
    if name not in _usable:
        _usable[name] = BACKENDS[name]._runs_here()
    return _usable[name]


def kernels(name: str) -> Kernels:
    """The kernels of backend ``name`` (what the custom ops call)."""
    return BACKENDS[name].kernels()


def available_backends() -> tuple[str, ...]:
    """The backends usable on this machine, of ("reference", "cpu", "triton", "cuda").

    "cpu" is listed once its C++ kernel has built (the first call builds it, ~20 s, then it is
    cached); "triton" where Triton is installed and a GPU is present, or ``TRITON_INTERPRET=1`` is
    set (then it runs on CPU tensors); "cuda" where a GPU is present and its kernels have built (the
    first call builds them with nvcc, then they are cached).
    """
    return tuple(name for name in BACKENDS if backend_usable(name))


# ---------------------------------------------------------------------------------------------------------------
# The choice.
# ---------------------------------------------------------------------------------------------------------------
GPU_BACKEND_CHOICE_FILE = Path(__file__).with_name("gpu_backend_choice.json")
GPU_KERNEL_BACKENDS = ("triton", "cuda")


def load_gpu_backend_choice(path: Path) -> dict[torch.dtype, tuple[tuple[int, str], ...]]:
    """The measured choice between the GPU kernels: ``{dtype: ((min_vocab, backend), ...)}``, ascending.

    The file (written by the GPU benchmark) is JSON: ``{"device": ..., "rules": [{"dtype": "bfloat16",
    "min_vocab": 0, "backend": "cuda", ...}, ...]}``. For logits of a dtype and vocabulary size V, the rule
    of that dtype with the largest ``min_vocab <= V`` names the faster backend; other keys (the device, the
    timings behind each rule) are the record and are not read. No file: no rules.
    """
    if not path.is_file():
        return {}
    rules: dict[torch.dtype, list[tuple[int, str]]] = {}
    for rule in json.loads(path.read_text())["rules"]:
        dtype = getattr(torch, str(rule.get("dtype")), None)
        min_vocab, backend = rule.get("min_vocab"), rule.get("backend")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{path}: rule {rule} has no floating-point 'dtype' (e.g. \"bfloat16\")")
        if isinstance(min_vocab, bool) or not isinstance(min_vocab, int) or min_vocab < 0:
            raise ValueError(f"{path}: rule {rule} needs an int 'min_vocab' >= 0")
        if backend not in GPU_KERNEL_BACKENDS:
            raise ValueError(f"{path}: rule {rule} needs 'backend' in {GPU_KERNEL_BACKENDS}")
        rules.setdefault(dtype, []).append((min_vocab, backend))
    return {dtype: tuple(sorted(pairs)) for dtype, pairs in rules.items()}


# Read once at import (a plain global, which dynamo reads while tracing).
_gpu_backend_choice = load_gpu_backend_choice(GPU_BACKEND_CHOICE_FILE)


def faster_gpu_backend(dtype: Optional[torch.dtype], vocab_size: Optional[int]) -> str:
    """The GPU kernel measured faster for this dtype and vocabulary size; "triton" without a rule."""
    choice = "triton"
    for min_vocab, backend in _gpu_backend_choice.get(dtype, ()):
        if vocab_size is not None and vocab_size >= min_vocab:
            choice = backend
    return choice


def choose_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                   vocab_size: Optional[int] = None) -> str:
    """The backend a call on ``device`` runs on: ``backend`` itself once checked (usable here, and taking tensors on
    ``device``), or for "auto" the choice of the module docstring (``dtype`` and ``vocab_size`` pick the GPU kernel)."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "cpu" if backend_usable("cpu") else "reference"
        faster = faster_gpu_backend(dtype, vocab_size)
        other = "cuda" if faster == "triton" else "triton"
        return next((name for name in (faster, other) if backend_usable(name)), "reference")
    if not backend_usable(backend):
        raise ValueError(f"backend {backend!r} is not available here; available: {available_backends()}")
    BACKENDS[backend].check_device(device)
    return backend
