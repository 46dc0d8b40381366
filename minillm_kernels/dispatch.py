"""Validation and backend choice, in one place, behind the two public functions.

``fused_reverse_kld`` and ``fused_token_stats`` check their arguments, hand the ``[..., V]`` logits to one
backend as they are (any strides in the leading dimensions: the kernels index rows through them, see
``ops/reverse_kld.py``; only a last dimension of stride other than 1 is copied) and reshape the per-token
``[N]`` results back (with ``process_group``, or DTensor logits, through ``parallel.py``: a vocabulary sharded over
processes). Backends:

=============  ===================================================  ==========================
backend        what runs                                            tensors
=============  ===================================================  ==========================
"reference"    the naive PyTorch formulas (``reference.py``)        any device, any float dtype
"cpu"          the fused C++ kernel (``csrc/cpu``), built on first  CPU
               use with ninja
"triton"       the Triton kernels (``ops/reverse_kld_triton.py``)   CUDA; CPU under
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
from minillm_kernels._arguments import as_int, as_real
from minillm_kernels.ops import divergence as divergence_ops
from minillm_kernels.ops import reverse_kld as ops

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


class _Rows(NamedTuple):
    """Validated inputs: the logits as given (N rows: their leading dimensions), the per-token tensors flattened."""

    student: torch.Tensor  # [..., V_s], last-dim stride 1, leading dims of any strides
    teacher: torch.Tensor  # [..., V_t], the same leading shape, last-dim stride 1, its own strides
    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str


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


def _validate(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    backend: str,
    shards: Optional[parallel.VocabShards] = None,
) -> _Rows:
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
    args = _validate_token_args(
        lead_shape, student_logits.device, torch.promote_types(student_logits.dtype, teacher_logits.dtype),
        {"student_logits": student_logits.shape[-1], "teacher_logits": teacher_logits.shape[-1]},
        target_ids, mask, temperature, vocab_size, backend, inputs="logits", shards=shards,
    )
    teacher_logits = frozen_teacher(teacher_logits, "teacher_logits")
    return _Rows(_unit_column_stride(student_logits), _unit_column_stride(teacher_logits), *args)


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


class _TokenArgs(NamedTuple):
    """The validated per-token arguments (the tail of ``_Rows``), for any producer of the logits."""

    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str


def _validate_token_args(
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
) -> _TokenArgs:
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
    as_real("temperature", temperature, 0.0, open_low=True)
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
    return _TokenArgs(target_ids, mask, lead_shape, vocab_size, _choose_backend(backend, device, dtype, vocab_size))


def _token_stats(rows: _Rows, temperature: float, shards: Optional[parallel.VocabShards] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, student_logprob, teacher_logprob, entropy)`` per row, ``[N]``, from the chosen backend (over the
    vocabulary the ranks of ``shards`` hold together, if given)."""
    if shards is not None:
        return parallel.logits_token_stats(shards, rows.student, rows.teacher, rows.target, rows.mask, temperature,
                                           rows.vocab_size, rows.backend)
    if rows.backend == "reference":  # the naive formulas, on [N, V] rows (a copy where the layout needs one)
        student, teacher = (x.reshape(-1, x.shape[-1]) for x in (rows.student, rows.teacher))
        return reference.token_stats(student, teacher, rows.target, rows.mask, temperature, rows.vocab_size)
    kl, student_logprob, teacher_logprob, entropy, _ = ops.token_stats(
        rows.student, rows.teacher, rows.target, rows.mask, 1.0 / temperature, rows.vocab_size, rows.backend
    )
    return kl, student_logprob, teacher_logprob, entropy


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


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def fused_reverse_kld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """Reverse KL divergence KL(q || p) of the student q from the teacher p, per token, fused.

    With q = softmax(s / T) and p = softmax(t / T) over the first ``vocab_size`` columns:
        KL_t = sum_v q_v (log q_v - log p_v),
        dKL_t / ds_v = (1/T) q_v (log q_v - log p_v - KL_t)   (no T^2 factor is applied).

    Args:
        student_logits: ``[..., V_s]`` float logits of the student (gets the gradient). The leading dimensions may
            have any strides (e.g. ``logits[:, -(N+1):-1]`` of a ``[B, L, V]`` output): the kernels read them in
            place, with no copy, where they coalesce into two levels of rows, as every slice, transpose or
            ``expand`` of a ``[B, L, V]`` tensor does (three or more leading dimensions that do not merge are
            copied). The gradient is a fresh contiguous tensor of this shape.
        teacher_logits: ``[..., V_t]`` float logits of the teacher, same leading shape, any float dtype (frozen),
            strides as for the student (its own).
        mask: optional bool ``[...]``, True where the token counts.
        temperature: T > 0, applied to both models.
        reduction: "none" (``[...]``, 0 where masked), "sum", or "mean" over unmasked tokens
            (0, with zero gradient, when there are none).
        vocab_size: the real vocabulary size when the logits are padded to different widths; columns
            at or past it are ignored in both, without a copy.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see ``available_backends()``).
        process_group: a vocabulary sharded over this group's P ranks (tensor parallelism): the logits are this
            rank's columns [r W, (r + 1) W) of the vocabulary, W the same on every rank and for both models;
            ``vocab_size`` (default P W) and target ids are global, the mask replicated. Every rank returns the
            same loss, the unsharded one, and gets its slice of the unsharded gradient; the ranks exchange a few
            numbers per token, never the logits (``parallel.py``). DTensor logits placed ``Shard(-1)`` bring
            their mesh's group and need none (e.g. the output of ``ColwiseParallel(use_local_output=False)``).

    Returns:
        The loss, float32 (float64 if either logits tensor is float64). Logits holding NaN give NaN.
    """
    _check_reduction(reduction)
    shards, (student_logits, teacher_logits) = _logits_shards(process_group, student_logits, teacher_logits)
    rows = _validate(student_logits, teacher_logits, None, mask, temperature, vocab_size, backend, shards)
    kl = _token_stats(rows, temperature, shards)[0]
    return _reduce(kl, rows.mask, rows.lead_shape, reduction)


def _reduce(per_token: torch.Tensor, mask: Optional[torch.Tensor], lead_shape: torch.Size,
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


def _check_divergence_args(divergence: str, beta: float, skew: float) -> tuple[float, float]:
    """``(beta, skew)`` as floats, after checking them and the divergence's name."""
    if divergence not in reference.DIVERGENCES:
        raise ValueError(f"divergence must be one of {reference.DIVERGENCES}, got {divergence!r}")
    beta = as_real("beta", beta, 0.0, 1.0, open_low=True, open_high=True,
                   hint=" (the teacher's weight in the JSD's mixture m = beta p + (1 - beta) q; at 0 or 1 the JSD is "
                        "0: for the limits use divergence='forward_kl' or 'reverse_kl', see docs/design.md)")
    skew = as_real("skew", skew, 0.0, 1.0, open_high=True,
                   hint=" (the leading model's weight in the skew KL's mixture; 0 is the plain KL, and at 1 the "
                        "divergence is 0)")
    return beta, skew


def fused_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """A divergence D(p, q) of the student q from the teacher p, per token, fused.

    With q = softmax(s / T) and p = softmax(t / T) over the first ``vocab_size`` columns, ``divergence`` is one of
        "reverse_kl"       KL(q || p) = sum_v q_v (log q_v - log p_v)                    (``fused_reverse_kld``)
        "forward_kl"       KL(p || q) = sum_v p_v (log p_v - log q_v)
        "jsd"              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (TRL's convention)
        "skew_forward_kl"  KL(p || m),  m = skew p + (1 - skew) q                         (DistiLLM's SKL)
        "skew_reverse_kl"  KL(q || m),  m = skew q + (1 - skew) p                         (DistiLLM's SRKL)
        "tvd"              1/2 sum_v |p_v - q_v|
    terms whose leading probability is 0 counting 0. The gradient, with a_v = dD/dq_v (docs/design.md lists them):
        dD/ds_v = (1/T) q_v (a_v - sum_u q_u a_u)   (no T^2 factor; 0 at p_v = q_v for the TVD's |.|).
    Passes over each row: the reverse KL 1 forward (online), 1 backward; the others 2 forward (both log-normalisers,
    then the terms), 1 backward. A skew of 0 is the plain KL and runs its kernel.

    Args:
        divergence: the name above.
        beta: the JSD's teacher weight, in (0, 1) (0.5: the symmetric JSD). JSD / beta -> KL(p || q) as beta -> 0 and
            JSD / (1 - beta) -> KL(q || p) as beta -> 1 (docs/design.md).
        skew: the skew KLs' alpha, in [0, 1) (DistiLLM's default 0.1).
        Other arguments as in ``fused_reverse_kld``. With ``process_group`` (or DTensor logits placed ``Shard(-1)``)
            every rank returns the unsharded loss and gets its slice of the unsharded gradient; per call the ranks
            all-gather per-token numbers, never logits: once for the KLs (6 a token), twice for the mixtures and
            the TVD (the 4 row statistics, then 2 partial sums), see ``parallel.py``; backends "cpu" and "triton".

    Returns:
        The loss, float32 (float64 if either logits tensor is float64). Logits holding NaN give NaN.
    """
    _check_reduction(reduction)
    beta, skew = _check_divergence_args(divergence, beta, skew)
    if divergence == "reverse_kl":
        return fused_reverse_kld(student_logits, teacher_logits, mask=mask, temperature=temperature,
                                 reduction=reduction, vocab_size=vocab_size, backend=backend,
                                 process_group=process_group)
    shards, (student_logits, teacher_logits) = _logits_shards(process_group, student_logits, teacher_logits)
    rows = _validate(student_logits, teacher_logits, None, mask, temperature, vocab_size, backend, shards)
    if shards is None:
        per_token = divergence_ops.divergence_rows(rows.student, rows.teacher, rows.mask, divergence, beta, skew,
                                                   temperature, rows.vocab_size, rows.backend)
    elif skew == 0 and divergence in ("skew_forward_kl", "skew_reverse_kl"):  # (the plain KL)
        return fused_divergence(student_logits, teacher_logits, divergence=divergence.removeprefix("skew_"),
                                mask=mask, temperature=temperature, reduction=reduction, vocab_size=vocab_size,
                                backend=backend, process_group=shards.group)
    else:
        coefficient = beta if divergence == "jsd" else skew
        per_token = parallel.logits_divergence(shards, rows.student, rows.teacher, rows.mask, divergence, coefficient,
                                               temperature, rows.vocab_size, rows.backend)
    return _reduce(per_token, rows.mask, rows.lead_shape, reduction)


def fused_token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    mix_alpha: float = 0.0,
    weight_clip: Optional[tuple[float, float]] = None,
    with_entropy: bool = False,
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> TokenStats:
    """Every per-token MiniLLM term for sampled tokens ``target_ids``, from one pass over the logits.

    With q = softmax(s / T), p = softmax(t / T) over the first ``vocab_size`` columns and y_t the target:
        reverse_kld       KL_t = sum_v q_v (log q_v - log p_v)
        student_logprob   log q(y_t)          teacher_logprob   log p(y_t)
        log_ratio         r_t = log p(y_t) - log q(y_t)                      (detached)
        importance_weight w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t)),
                          clipped to ``weight_clip = (lo, hi)`` if given     (detached)
        entropy           H_t = -sum_v q_v log q_v   (if ``with_entropy``)
    Gradients flow to the student logits through reverse_kld, student_logprob and entropy:
        d/ds_v = (1/T)(a q_v (log q_v - log p_v - KL_t) + b ([v = y_t] - q_v) - c q_v (log q_v + H_t))
    with a, b, c the upstream gradients of the three, in one backward pass.

    Args:
        target_ids: integer ``[...]`` token ids in ``[0, vocab_size)`` where the mask is True
            (masked positions may hold anything, e.g. -100).
        mix_alpha: alpha in [0, 1] of the teacher-mixed sampling distribution (0: w = 1).
        weight_clip: optional ``(lo, hi)`` with 0 <= lo <= hi.
        Other arguments as in ``fused_reverse_kld`` (with ``process_group``, ``target_ids`` are global ids and
        every rank gets the same ``TokenStats``).

    Returns:
        ``TokenStats`` of ``[...]`` tensors (float32; float64 if either logits tensor is float64), 0 where masked.
    """
    mix_alpha, weight_clip = _check_sampling_args(target_ids, mix_alpha, weight_clip)
    shards, (student_logits, teacher_logits) = _logits_shards(process_group, student_logits, teacher_logits)
    rows = _validate(student_logits, teacher_logits, target_ids, mask, temperature, vocab_size, backend, shards)
    kl, student_logprob, teacher_logprob, entropy = _token_stats(rows, temperature, shards)
    return _assemble_token_stats(
        kl, student_logprob, teacher_logprob, entropy if with_entropy else None,
        rows.mask, rows.lead_shape, mix_alpha, weight_clip,
    )


def _logits_shards(process_group, student_logits, teacher_logits):
    """``(shards or None, (student_logits, teacher_logits) as this rank's local tensors)``: ``parallel.vocab_shards``
    of a logits-level call."""
    shards, logits = parallel.vocab_shards(
        process_group, {"student_logits": (student_logits, -1), "teacher_logits": (teacher_logits, -1)})
    return shards, logits


def _check_sampling_args(
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


def _assemble_token_stats(
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
