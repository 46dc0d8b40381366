"""Validation and backend choice, in one place, for every public function (``losses.py``, ``fused_linear.py``).

The argument checks (``validate_logits``, ``validate_token_args``, ``check_*``: each error names the argument and
the fix), the reductions (``reduce_per_token``), the ``TokenStats`` the token-level functions return, and the
backend each call runs on:

=============  ===================================================  ==========================
backend        what runs                                            tensors
=============  ===================================================  ==========================
"reference"    the naive PyTorch formulas (``reference.py``)        any device, any float dtype
"cpu"          the fused C++ kernels (``csrc/cpu``), built on first CPU
               use with ninja
"triton"       the Triton kernels (``ops/*_triton.py``)             CUDA; CPU under
                                                                    ``TRITON_INTERPRET=1``
"cuda"         the CUDA C++ kernels (``csrc/cuda``), built on first  CUDA
               use with ninja and nvcc for the device's capability
=============  ===================================================  ==========================

``backend="auto"`` picks "cpu" for CPU tensors. For CUDA tensors it picks, per logits dtype and
vocabulary size, the faster of "triton" and "cuda" as measured on a GPU and recorded in
``gpu_backend_choice.json`` beside this file (see ``load_gpu_backend_choice``), and "triton" where that
file is absent or has no rule for the case. Where the chosen backend is not available it falls back to
the other GPU kernel, then to "reference".
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from minillm_kernels import parallel, reference
from minillm_kernels._arguments import as_beta, as_int, as_number, as_real, as_skew, as_temperature

BACKENDS = ("reference", "cpu", "triton", "cuda")
REDUCTIONS = ("none", "sum", "mean")


class TokenStats(NamedTuple):
    """Per-token MiniLLM terms, each of the logits' leading shape, 0 where the mask is False.

    reverse_kld:       KL_t = sum_v q_v (log q_v - log p_v)            (differentiable)
    student_logprob:   log q(y_t)                                      (differentiable)
    teacher_logprob:   log p(y_t)                                      (no gradient: teacher)
    log_ratio:         r_t = log p(y_t) - log q(y_t)                   (detached)
    importance_weight: w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t)), optionally clipped (detached)
    entropy:           H_t = -sum_v q_v log q_v, or None unless asked for  (differentiable)
    """

    reverse_kld: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    log_ratio: torch.Tensor
    importance_weight: torch.Tensor
    entropy: Optional[torch.Tensor]


def _triton_usable() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    )


def _cpu_usable() -> bool:
    from minillm_kernels.cpu import load_extension

    return load_extension() is not None


def _cuda_usable() -> bool:
    from minillm_kernels.cuda import load_extension

    return torch.cuda.is_available() and load_extension() is not None


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


def _faster_gpu_backend(dtype: Optional[torch.dtype], vocab_size: Optional[int]) -> str:
    """The GPU kernel measured faster for this dtype and vocabulary size; "triton" without a rule."""
    choice = "triton"
    for min_vocab, backend in _gpu_backend_choice.get(dtype, ()):
        if vocab_size is not None and vocab_size >= min_vocab:
            choice = backend
    return choice


_USABILITY_CHECKS = {"reference": lambda: True, "cpu": _cpu_usable, "triton": _triton_usable, "cuda": _cuda_usable}
_usable: dict[str, bool] = {}  # filled one backend at a time, on first use


@torch.compiler.assume_constant_result  # while tracing, run eagerly and take the answer as a constant
def backend_usable(name: str) -> bool:
    """Whether backend ``name`` runs here. The first call for "cpu" or "cuda" builds that kernel (then cached),
    and only that backend's: asking for "reference" builds nothing."""
    if name not in _usable:
        _usable[name] = _USABILITY_CHECKS[name]()
    return _usable[name]


def available_backends() -> tuple[str, ...]:
    """The backends usable on this machine, of ("reference", "cpu", "triton", "cuda").

    "cpu" is listed once its C++ kernel has built (the first call builds it, ~20 s, then it is
    cached); "triton" where Triton is installed and a GPU is present, or ``TRITON_INTERPRET=1`` is
    set (then it runs on CPU tensors); "cuda" where a GPU is present and its kernels have built (the
    first call builds them with nvcc, then they are cached).
    """
    return tuple(name for name in BACKENDS if backend_usable(name))


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _choose_backend(
    backend: str, device: torch.device, dtype: Optional[torch.dtype] = None, vocab_size: Optional[int] = None
) -> str:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "cpu" if backend_usable("cpu") else "reference"
        faster = _faster_gpu_backend(dtype, vocab_size)
        other = "cuda" if faster == "triton" else "triton"
        return next((name for name in (faster, other) if backend_usable(name)), "reference")
    if not backend_usable(backend):
        raise ValueError(f"backend {backend!r} is not available here; available: {available_backends()}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, but the logits are on {device}")
    if backend == "triton" and device.type != "cuda" and not _interpreting_triton():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), the logits are on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, the logits are on {device}")
    return backend


class LogitsCall(NamedTuple):
    """Validated inputs: the logits as given (N rows: their leading dimensions), the per-token tensors flattened."""

    student: torch.Tensor  # [..., V_s], last-dim stride 1, leading dims of any strides
    teacher: torch.Tensor  # [..., V_t], the same leading shape, last-dim stride 1, its own strides
    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str
    temperature: float


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` itself when its last dimension has stride 1, whatever the leading dimensions' strides (the
    kernels take those as they are), else a contiguous copy."""
    return logits if logits.stride(-1) == 1 or logits.shape[-1] == 1 else logits.contiguous()


def _check_companion(name: str, x: object, lead_shape: torch.Size, device: torch.device, inputs: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.shape != lead_shape:
        raise ValueError(f"{name} must have the {inputs}' leading shape {tuple(lead_shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the {inputs} are on {device}")


def validate_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    backend: str,
    shards: Optional[parallel.VocabShards] = None,
) -> LogitsCall:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )
    lead_shape = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead_shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must agree on every dimension but the last"
        )
    args = validate_token_args(
        lead_shape, student_logits.device, torch.promote_types(student_logits.dtype, teacher_logits.dtype),
        {"student_logits": student_logits.shape[-1], "teacher_logits": teacher_logits.shape[-1]},
        target_ids, mask, temperature, vocab_size, backend, inputs="logits", shards=shards,
    )
    teacher_logits = frozen_teacher(teacher_logits, "teacher_logits")
    return LogitsCall(_unit_column_stride(student_logits), _unit_column_stride(teacher_logits), *args)


_warned_about_teacher_grad = False


def frozen_teacher(teacher: torch.Tensor, name: str) -> torch.Tensor:
    """``teacher.detach()``: the teacher gets no gradient. A teacher tensor that requires grad is warned about
    once per process (it usually means the teacher ran with autograd on, keeping its whole graph alive)."""
    global _warned_about_teacher_grad
    if teacher.requires_grad and not _warned_about_teacher_grad and not torch.compiler.is_compiling():
        _warned_about_teacher_grad = True
        warnings.warn(
            f"{name} requires grad, but the teacher is frozen and gets no gradient; compute it under "
            f"torch.no_grad() (or pass {name}.detach()) to free its autograd graph. Warned once.",
            UserWarning, stacklevel=4,
        )
    return teacher.detach()


class TokenArgs(NamedTuple):
    """The validated per-token arguments (the tail of ``LogitsCall``), for any producer of the logits."""

    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str
    temperature: float  # a Python float, whatever number type was given


def validate_token_args(
    lead_shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
    vocab_widths: dict[str, int],
    target_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    backend: str,
    *,
    inputs: str,
    shards: Optional[parallel.VocabShards] = None,
) -> TokenArgs:
    """Checks what the logits-level and fused-linear functions share, once the logits' leading shape, device,
    dtype and vocabulary widths are known. ``vocab_widths`` maps the student's then the teacher's argument name
    to its vocabulary width (logits columns, or weight rows); ``inputs`` names the tensors that fix the leading
    shape and device ("logits", "hidden states") in the messages. With ``shards`` the widths are local, equal for
    both models, and ``vocab_size`` and the ids are global (up to the ranks' widths together)."""
    (student_name, student_width), (teacher_name, teacher_width) = vocab_widths.items()
    vocab_name = "vocab_size"
    if shards is not None:
        if student_width != teacher_width:
            raise ValueError(
                f"with a process group, {student_name} and {teacher_name} must cover the same vocabulary columns: "
                f"rank r holds global columns [r W, (r + 1) W) of both, but their local widths are {student_width} "
                f"and {teacher_width}; pad both models' vocabularies to the same size"
            )
        vocab_name = f"vocab_size (global: {shards.world} ranks x {student_width} columns at most)"
        student_width = teacher_width = shards.world * student_width
    if vocab_size is None:
        if student_width != teacher_width:
            raise ValueError(
                f"{student_name} has {student_width} vocab entries and {teacher_name} {teacher_width}; "
                "pass vocab_size= (the real vocabulary size) to compare padded logits"
            )
        vocab_size = student_width
    else:  # (at most the narrower width: the real vocabulary fits in both)
        vocab_size = as_int(vocab_name, vocab_size, 1, min(student_width, teacher_width))
    temperature = as_temperature(temperature, reference.compute_dtype(dtype))
    if mask is not None:
        _check_companion("mask", mask, lead_shape, device, inputs)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = the token counts), got {mask.dtype}")
        mask = mask.reshape(-1).contiguous()
    if target_ids is not None:
        _check_companion("target_ids", target_ids, lead_shape, device, inputs)
        if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
            raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
        target_ids = target_ids.reshape(-1).to(torch.int64).contiguous()
        # A data-dependent check: skipped while tracing (the kernels then give NaN log-probabilities for an
        # out-of-range id) and on meta tensors (no data).
        if not torch.compiler.is_compiling() and device.type != "meta":
            counted = target_ids if mask is None else target_ids[mask]
            if counted.numel() and not bool(((counted >= 0) & (counted < vocab_size)).all()):
                raise ValueError(
                    f"target_ids must lie in [0, vocab_size={vocab_size}) where the mask is True; "
                    f"got values in [{int(counted.min())}, {int(counted.max())}]"
                )
    return TokenArgs(target_ids, mask, lead_shape, vocab_size, _choose_backend(backend, device, dtype, vocab_size),
                     temperature)


def importance_weight(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, mix_alpha: float) -> torch.Tensor:
    """w = q(y) / (alpha p(y) + (1 - alpha) q(y)), from the log-probabilities.

    Computed as 1 / (alpha exp(log p - log q) + 1 - alpha): exactly 1 for alpha = 0 (whatever q(y), even 0),
    q/p for alpha = 1, and 0 where q(y) = 0 < alpha (there exp(log p - log q) = inf). NaN log-probabilities
    (an out-of-range target under torch.compile) give NaN.
    """
    if mix_alpha == 0:
        return torch.where(student_logprob.isnan() | teacher_logprob.isnan(), math.nan, 1.0).to(student_logprob.dtype)
    weight = 1.0 / (mix_alpha * (teacher_logprob - student_logprob).exp() + (1.0 - mix_alpha))
    return torch.where(student_logprob == -math.inf, 0.0, weight)  # q(y) = 0: 0, even where p(y) = 0 too


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_per_token(per_token: torch.Tensor, mask: Optional[torch.Tensor], lead_shape: torch.Size,
            reduction: str) -> torch.Tensor:
    """The ``[N]`` per-token loss (0 where masked) reduced: "none" reshaped to ``lead_shape``, "sum", or "mean" over
    the unmasked tokens (0, with zero gradient, when there are none)."""
    if reduction == "none":
        return per_token.reshape(lead_shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    count = per_token.new_tensor(per_token.numel()) if mask is None else mask.sum()
    return total / count.clamp(min=1)


def check_divergence_args(divergence: str, beta: float, skew: float) -> tuple[float, float]:
    """``(beta, skew)`` as floats, after checking them and the divergence's name. While torch.compile traces, only
    their types: a failing range check cannot raise then (the graph would break), so the ops check the coefficient
    their divergence uses when the graph runs, with the same ValueError (``ops.divergence.check_coefficient``)."""
    if divergence not in reference.DIVERGENCES:
        raise ValueError(f"divergence must be one of {reference.DIVERGENCES}, got {divergence!r}")
    if torch.compiler.is_compiling():
        return as_number("beta", beta), as_number("skew", skew)
    return as_beta(beta), as_skew(skew)


def logits_shards(process_group, student_logits, teacher_logits):
    """``(shards or None, (student_logits, teacher_logits) as this rank's local tensors)``: ``parallel.vocab_shards``
    of a logits-level call."""
    shards, logits = parallel.vocab_shards(
        process_group, {"student_logits": (student_logits, -1), "teacher_logits": (teacher_logits, -1)})
    return shards, logits


def check_sampling_args(
    target_ids: Optional[torch.Tensor], mix_alpha: float, weight_clip: Optional[tuple[float, float]]
) -> tuple[float, Optional[tuple[float, float]]]:
    """``(mix_alpha, weight_clip)`` as floats, after checking them and that ``target_ids`` is given."""
    mix_alpha = as_real("mix_alpha", mix_alpha, 0.0, 1.0)
    if weight_clip is not None:
        if not isinstance(weight_clip, (tuple, list)) or len(weight_clip) != 2:
            raise ValueError(f"weight_clip must be None or a pair (lo, hi) with 0 <= lo <= hi, got {weight_clip!r}")
        low = as_real("weight_clip[0] (lo)", weight_clip[0], 0.0)
        high = as_real("weight_clip[1] (hi)", weight_clip[1], low)
        weight_clip = (low, high)
    if target_ids is None:
        raise TypeError("target_ids must be a tensor of token ids, got None")
    return mix_alpha, weight_clip


def assemble_token_stats(
    kl: torch.Tensor,
    student_logprob: torch.Tensor,
    teacher_logprob: torch.Tensor,
    entropy: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    lead_shape: torch.Size,
    mix_alpha: float,
    weight_clip: Optional[tuple[float, float]],
) -> TokenStats:
    """``TokenStats`` of ``lead_shape`` from the per-row ``[N]`` kernel outputs: adds the detached log-ratio
    and importance weight (clipped, 0 where masked); the teacher's log-probability is detached too."""
    teacher_logprob = teacher_logprob.detach()
    log_ratio = teacher_logprob - student_logprob.detach()
    weight = importance_weight(student_logprob.detach(), teacher_logprob, mix_alpha)
    if weight_clip is not None:
        weight = weight.clamp(weight_clip[0], weight_clip[1])
    if mask is not None:
        weight = torch.where(mask, weight, 0.0)
    fields = (kl, student_logprob, teacher_logprob, log_ratio, weight, entropy)
    return TokenStats(*(None if x is None else x.reshape(lead_shape) for x in fields))
