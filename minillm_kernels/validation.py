"""Validation, in one place, for every public function (``losses.py``, ``linear.py``): each error names the argument
and the fix.

The scalars (``as_int``, ``as_real``, ``as_temperature``, ...): Python numbers, NumPy scalars (``np.int64(50)``,
``np.float32(0.7)``) and 0-dim tensors are accepted and turned into ``int`` / ``float``; anything else is a
``TypeError`` that names the argument and the type wanted, and a value out of range a ``ValueError`` that gives the
range. The checks are written with comparisons only (no ``math.isfinite``), so that ``torch.compile(dynamic=True)``
traces them when a float argument is symbolic. Under torch.compile a 0-dim tensor is refused (its value is known only
when the graph runs, and no check or kernel can take it as a number then), and a failing check cannot raise while
tracing (the graph breaks): where a bad value is a caller's runtime input (beta, skew), the ops check it again when the
graph runs (``check_coefficient``).

The divergence and its coefficient (``divergence_coefficient``): the name checked, a skew of 0 turned into the plain KL
it is, and the one number the kernels take (beta for the JSD, the skew for the skew KLs).

The tensors: ``validate_logits`` (logits), ``validate_sparse_teacher`` (a top-k teacher), ``validate_linear``
(hidden states and lm_heads), ``validate_linear_sparse`` (the student's hidden states and lm_head, a top-k
teacher), all through ``validate_token_args`` (vocab_size, temperature, mask, target ids and the backend,
``backends.choose_backend``'s); the data-dependent checks run in eager mode only.
"""
from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from minillm_kernels.backends import choose_backend, compute_dtype
from minillm_kernels.reference import DIVERGENCES, SPARSE_TAILS

if TYPE_CHECKING:
    from minillm_kernels.parallel import VocabShards


# ---------------------------------------------------------------------------------------------------------------
# Scalars
# ---------------------------------------------------------------------------------------------------------------
def _unwrap(name: str, value: object) -> object:
    """A 0-dim tensor's Python number, in eager mode. One that requires grad is refused: no gradient flows to these
    arguments (only to the student's logits or hidden states), which a Python number would silently drop."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.requires_grad:
            raise TypeError(f"{name} is a tensor that requires grad, but no gradient flows to {name} (only to the "
                            f"student's logits or hidden states): pass {name}.detach() or a Python number")
        if torch.compiler.is_compiling():
            raise TypeError(f"{name} is a 0-dim tensor, whose value a compiled graph has only when it runs, too late "
                            f"to pass it to the kernels as a number: under torch.compile pass a Python number "
                            f"({name}=float({name}) before calling the compiled function)")
        return value.item()
    return value


def as_int(name: str, value: object, low: int, high: float = math.inf) -> int:
    """``value`` as an ``int`` in ``[low, high]``."""
    value = _unwrap(name, value)
    if isinstance(value, bool) or not isinstance(value, (Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value if isinstance(value, (int, torch.SymInt)) else int(value)  # (a symbolic size stays symbolic)


def as_number(name: str, value: object) -> float:
    """``value`` as a Python (or symbolic) number, unchecked: the type check of ``as_real``."""
    value = _unwrap(name, value)
    if isinstance(value, bool) or not isinstance(value, (Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return value


def as_real(name: str, value: object, low: float = -math.inf, high: float = math.inf, *,
            open_low: bool = False, open_high: bool = False, hint: str = "") -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (open at the ends ``open_low`` / ``open_high`` name); NaN is
    refused. ``hint`` is added to the out-of-range message (what the value means, what to pass instead)."""
    value = as_number(name, value)
    above_low = value > low if open_low else value >= low
    below_high = value < high if open_high else value <= high
    # NaN fails every comparison; +-inf fails the finite bounds below.
    if not (above_low and below_high and -math.inf < value < math.inf):
        raise ValueError(f"{name} must be {_range_words(low, high, open_low, open_high)}, got {value!r}{hint}")
    return value if isinstance(value, (float, torch.SymFloat)) else float(value)


def as_beta(value: object) -> float:
    """``value`` as the JSD's beta, the teacher's weight in its mixture: in (0, 1)."""
    return as_real("beta", value, 0.0, 1.0, open_low=True, open_high=True,
                   hint=" (the teacher's weight in the JSD's mixture m = beta p + (1 - beta) q; at 0 or 1 the JSD is "
                        "0: for the limits use divergence='forward_kl' or 'reverse_kl', see docs/design.md)")


def as_skew(value: object) -> float:
    """``value`` as the skew KLs' skew, the leading model's weight in their mixture: in [0, 1)."""
    return as_real("skew", value, 0.0, 1.0, open_high=True,
                   hint=" (the leading model's weight in the skew KL's mixture; 0 is the plain KL, and at 1 the "
                        "divergence is 0)")


def as_softcap(name: str, value: object) -> Optional[float]:
    """``value`` as a soft cap c of logits z -> c tanh(z / c): None (no cap) or a finite c > 0."""
    if value is None:
        return None
    return as_real(name, value, 0.0, open_low=True,
                   hint=" (the logits z become c tanh(z / c), e.g. Gemma-2's final_logit_softcapping 30.0: a finite "
                        "c > 0, or None for no cap)")


def as_temperature(value: object, compute_dtype: torch.dtype) -> float:
    """``value`` as the temperature T of logits computed in ``compute_dtype`` (float32, or float64): a finite T > 0
    whose reciprocal is finite there too (``smallest_temperature``), as every backend scales the logits by k = 1/T."""
    temperature = as_real("temperature", value, 0.0, open_low=True)
    smallest = _SMALLEST_TEMPERATURE[compute_dtype]
    if not temperature >= smallest:
        dtype = str(compute_dtype).removeprefix("torch.")
        wider = "; float64 logits allow smaller temperatures" if compute_dtype != torch.float64 else ""
        raise ValueError(f"temperature must be >= {smallest!r} for logits computed in {dtype} (the logits are scaled "
                         f"by 1/temperature, which must be finite in {dtype}), got {temperature!r}{wider}")
    return temperature


def smallest_temperature(dtype: torch.dtype) -> float:
    """The smallest T > 0 whose reciprocal, computed in float64 (as the kernels receive it), is at most ``dtype``'s
    largest number: 1 / max, or a few float64 steps above it where 1 / (1 / max) rounds past max (float64's own)."""
    largest = torch.finfo(dtype).max
    temperature = 1.0 / largest
    while not 1.0 / temperature <= largest:
        temperature = math.nextafter(temperature, math.inf)
    return temperature


# Of the two compute dtypes (computed once: torch.compile traces a dict lookup, not the loop).
_SMALLEST_TEMPERATURE = {dtype: smallest_temperature(dtype) for dtype in (torch.float32, torch.float64)}


def _range_words(low: float, high: float, open_low: bool, open_high: bool = False) -> str:
    """"a finite number > 0", "a number in [0, 1]", "a number in (0, 1)", ..."""
    if high == math.inf:
        return "a finite number" if low == -math.inf else f"a finite number {'>' if open_low else '>='} {low:g}"
    return f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


REDUCTIONS = ("none", "sum", "mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")



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


# ---------------------------------------------------------------------------------------------------------------
# The divergence and its coefficient
# ---------------------------------------------------------------------------------------------------------------
# The coefficient each divergence of the family takes, and its check (the others take none).
COEFFICIENT_CHECKS = {"jsd": as_beta, "skew_forward_kl": as_skew, "skew_reverse_kl": as_skew}


def divergence_coefficient(divergence: str, beta: float, skew: float) -> tuple[str, float]:
    """``(divergence, coefficient)`` as the kernels take them, from the public ``divergence``, ``beta`` and ``skew``:
    the name checked (one of ``reference.DIVERGENCES``); a skew KL with skew 0 is the plain KL it equals (the
    mixture's formula is ill-conditioned there: its kernel is the plain KL's); the coefficient is beta for "jsd", the
    skew for the skew KLs, 0.0 for the others. Both beta and skew are range-checked in eager mode; while
    torch.compile traces, only their types (a failing range check cannot raise then: the graph would break), and the
    ops check the coefficient when the graph runs, with the same ValueError (``check_coefficient``)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if torch.compiler.is_compiling():
        beta, skew = as_number("beta", beta), as_number("skew", skew)
    else:
        beta, skew = as_beta(beta), as_skew(skew)
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and skew == 0:
        return divergence.removeprefix("skew_"), 0.0
    return divergence, {"jsd": beta, "skew_forward_kl": skew, "skew_reverse_kl": skew}.get(divergence, 0.0)


def check_coefficient(divergence: str, coefficient: float) -> None:
    """The range check of the coefficient ``divergence`` takes (``COEFFICIENT_CHECKS``), with its ValueError: what the
    ops run first, so that under torch.compile a bad value gives eager mode's error."""
    if divergence in COEFFICIENT_CHECKS:
        COEFFICIENT_CHECKS[divergence](coefficient)


# ---------------------------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------------------------
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


def check_companion(name: str, x: object, lead_shape: torch.Size, device: torch.device, inputs: str) -> None:
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
    shards: Optional[VocabShards] = None,
) -> LogitsCall:
    """Checks the logits-level functions' arguments (``shards``: the logits are this rank's columns of a sharded
    vocabulary, ``parallel.vocab_shards``), and picks the backend."""
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
    shards: Optional[VocabShards] = None,
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
    temperature = as_temperature(temperature, compute_dtype(dtype))
    if mask is not None:
        check_companion("mask", mask, lead_shape, device, inputs)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = the token counts), got {mask.dtype}")
        mask = mask.reshape(-1).contiguous()
    if target_ids is not None:
        check_companion("target_ids", target_ids, lead_shape, device, inputs)
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
    return TokenArgs(target_ids, mask, lead_shape, vocab_size, choose_backend(backend, device, dtype, vocab_size),
                     temperature)



# ---------------------------------------------------------------------------------------------------------------
# A sparse teacher
# ---------------------------------------------------------------------------------------------------------------
class SparseCall(NamedTuple):
    """Validated inputs: the student as given (its N rows: the leading dimensions), the teacher as ``[N, K]``
    contiguous tensors (ids int32 or int64, log-probabilities detached), the per-token tensors flattened."""

    student: torch.Tensor  # [..., V_s], last-dim stride 1, leading dims of any strides
    ids: torch.Tensor  # [N, K]
    logprobs: torch.Tensor  # [N, K]
    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    lead_shape: torch.Size
    vocab_size: int
    backend: str
    temperature: float  # a Python float, whatever number type was given


def validate_sparse_teacher(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    target_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    backend: str,
    tail: str,
    shards: Optional[VocabShards] = None,
) -> SparseCall:
    """Checks every argument the sparse functions share (docs/design.md, "Validation"), then the data-dependent ones
    in eager mode (skipped while tracing and on meta tensors) over the rows the mask keeps. With ``shards`` the
    student's logits are this rank's columns of a sharded vocabulary, and ``vocab_size`` and the ids are global."""
    check_tail(tail)
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a tensor, got {type(student_logits).__name__}")
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating-point tensor, got {student_logits.dtype}")
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have shape [..., V] with V >= 1, got {tuple(student_logits.shape)}")
    lead_shape = student_logits.shape[:-1]
    _check_sparse_teacher_tensors(teacher_ids, teacher_logprobs, "student_logits", student_logits.device, lead_shape)
    width = student_logits.shape[-1]
    # (The teacher has no width of its own: its ids are checked against vocab_size, which the student's width bounds.)
    args = validate_token_args(
        lead_shape, student_logits.device, compute_dtype(student_logits.dtype, teacher_logprobs.dtype),
        {"student_logits": width, "teacher_ids": width}, target_ids, mask, temperature, vocab_size, backend,
        inputs="logits", shards=shards,
    )
    ids, logprobs = _sparse_teacher_rows(teacher_ids, teacher_logprobs, args)
    return SparseCall(_unit_column_stride(student_logits), ids, logprobs, *args)


def check_tail(tail: str) -> None:
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {SPARSE_TAILS}, got {tail!r}")


def _check_sparse_teacher_tensors(teacher_ids: object, teacher_logprobs: object, student_name: str,
                                  device: torch.device, lead_shape: torch.Size) -> None:
    """``teacher_ids`` (integer) and ``teacher_logprobs`` (float) ``[..., K]`` tensors, K >= 1, on the student's
    ``device``, with its ``lead_shape`` (``student_name``: the student's tensor that fixes both, in the messages)."""
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but {student_name} is on {device}")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor (int32 or int64), got {teacher_ids.dtype}")
    if not teacher_logprobs.is_floating_point():
        raise TypeError(f"teacher_logprobs must be a floating-point tensor, got {teacher_logprobs.dtype}")
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must have the same shape [..., K]")
    if teacher_ids.dim() == 0 or teacher_ids.shape[:-1] != lead_shape or teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids and teacher_logprobs must have shape [..., K] (K >= 1) with the student's "
                         f"leading shape {tuple(lead_shape)} (that of {student_name}), got {tuple(teacher_ids.shape)}")


def _sparse_teacher_rows(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                         args: TokenArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` as the kernels take them, ``[N, K]`` contiguous (ids int32 or int64, log-probabilities
    detached), after checking K <= vocab_size and, in eager mode, the entries of the rows the mask keeps
    (``_check_entries``)."""
    k = teacher_ids.shape[-1]
    if k > args.vocab_size:
        raise ValueError(f"teacher_ids has K = {k} entries per token, more than vocab_size = {args.vocab_size}: a "
                         "teacher's top-k has at most one entry per column (pass k <= vocab_size to topk_teacher)")
    ids = teacher_ids.reshape(-1, k)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    logprobs = frozen_teacher(teacher_logprobs, "teacher_logprobs").reshape(-1, k)
    if not torch.compiler.is_compiling() and ids.device.type != "meta":
        _check_entries(ids, logprobs, args.mask, args.vocab_size)
    return ids.contiguous(), logprobs.contiguous()


def logprob_mass_tolerance(logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How far above 1 a row's sum_I p_k may lie from rounding alone, ``[N]`` float64, of ``[N, K]`` log-probabilities
    (-inf: no entry):

        tol = sum_k p_k ((1 + |log p_k|) eps_d + 8 eps_32 (1 + log V)),

    eps_d the machine epsilon of their dtype: rounding log p_k to it moves p_k by up to p_k |log p_k| eps_d / 2, and a
    float32 log-softmax over V columns errs by a few eps_32 (1 + log V) in every log-probability (its
    log-normaliser)."""
    eps = torch.finfo(logprobs.dtype).eps
    eps_32 = torch.finfo(torch.float32).eps
    log_p = logprobs.double()
    live = log_p != -math.inf
    per_entry = (1 + log_p.abs()) * eps + 8 * eps_32 * (1 + math.log(vocab_size))
    return torch.where(live, log_p.exp() * per_entry, 0.0).sum(-1)


def _check_entries(ids: torch.Tensor, logprobs: torch.Tensor, mask: Optional[torch.Tensor], vocab_size: int) -> None:
    """The data-dependent checks over the rows ``mask`` keeps: ids of live entries in range and distinct, no
    log-probability above 0, sum_I p_k <= 1 + ``logprob_mass_tolerance``. NaN log-probabilities pass (they give NaN)."""
    if mask is not None:
        ids, logprobs = ids[mask], logprobs[mask]
    if ids.numel() == 0:
        return
    live = logprobs != -math.inf
    live_ids = ids[live]
    if live_ids.numel() and not bool(((live_ids >= 0) & (live_ids < vocab_size)).all()):
        raise ValueError(f"teacher_ids must lie in [0, vocab_size={vocab_size}) where the log-probability is > -inf "
                         f"and the mask is True; got values in [{int(live_ids.min())}, {int(live_ids.max())}]")
    # Dead entries get distinct negative stand-ins, so that only live ids can repeat.
    stand_in = -1 - torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int64)
    ordered = torch.where(live, ids.to(torch.int64), stand_in).sort(-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        row = int(repeated.any(-1).nonzero()[0])
        column = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(f"teacher_ids repeat within a row (a kept row has id {column} twice): a teacher's top-k has "
                         "distinct ids; mark unused entries with a log-probability of -inf instead")
    if bool((logprobs > 0).any()):
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0), got a maximum of "
                         f"{float(logprobs.max()):.6g}: pass log_softmax(teacher_logits / T)'s top-k "
                         "(e.g. mk.topk_teacher), not logits")
    excess = torch.where(live, logprobs.double().exp(), 0.0).sum(-1) - 1
    tolerance = logprob_mass_tolerance(logprobs, vocab_size)
    over = excess > tolerance
    if bool(over.any()):
        row = int(over.nonzero()[0])
        raise ValueError(f"teacher_logprobs of a row sum, as probabilities, to 1 + {float(excess[row]):.3g}, above 1 "
                         f"by more than rounding ({float(tolerance[row]):.3g}): they must be normalised over the "
                         "teacher's full vocabulary (log_softmax of all its logits, then the top-k; not a "
                         "log_softmax of the top-k)")


# ---------------------------------------------------------------------------------------------------------------
# Hidden states and lm_heads
# ---------------------------------------------------------------------------------------------------------------
def _check_projection(model: str, hidden: object, weight: object, bias: object) -> None:
    """One model's hidden states [..., H], weight [V, H] and optional bias [V]: float tensors on one device (their
    dtypes may differ: the matmul runs in the weight's)."""
    named = {f"{model}_hidden": hidden, f"{model}_weight": weight, f"{model}_bias": bias}
    for name, x in named.items():
        if x is None and name.endswith("_bias"):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {model}_hidden is on {hidden.device}")
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{model}_hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{model}_weight must have shape [V, H] with V >= 1 and H = {model}_hidden.shape[-1] = {hidden.shape[-1]} "
            f"(the lm_head weight, as nn.Linear stores it), got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{model}_bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")


class LinearCall(NamedTuple):
    """The validated inputs of a fused-linear call, in the custom ops' argument order."""

    tensors: tuple  # flattened student (hidden, weight, bias) and teacher (hidden, weight, bias), the teacher's detached
    target: Optional[torch.Tensor]  # [N] int64
    mask: Optional[torch.Tensor]  # [N] bool
    options: tuple  # (temperature, vocab_size, chunk_size: 0 for the default, backend)
    lead_shape: torch.Size
    shards: Optional[VocabShards]  # the weights' rows are this rank's shard of the vocabulary


def validate_linear(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    target_ids, mask, temperature, vocab_size, chunk_size, backend, shards: Optional[VocabShards],
) -> LinearCall:
    """Check everything a fused-linear function takes (the tensors local ones: ``parallel.vocab_shards``'s)."""
    _check_projection("student", student_hidden, student_weight, student_bias)
    _check_projection("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if student_hidden.device != teacher_hidden.device:
        raise ValueError(f"student_hidden is on {student_hidden.device} but teacher_hidden is on {teacher_hidden.device}")
    lead_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead_shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must "
            "agree on every dimension but the last (the hidden sizes may differ)"
        )
    chunk_size = 0 if chunk_size is None else as_int("chunk_size (tokens per chunk, or None)", chunk_size, 1)
    args = validate_token_args(
        lead_shape, student_hidden.device, torch.promote_types(student_weight.dtype, teacher_weight.dtype),
        {"student_weight": student_weight.shape[0], "teacher_weight": teacher_weight.shape[0]},
        target_ids, mask, temperature, vocab_size, backend, inputs="hidden states", shards=shards,
    )
    teacher = tuple(None if x is None else frozen_teacher(x, name) for x, name in (
        (teacher_hidden, "teacher_hidden"), (teacher_weight, "teacher_weight"), (teacher_bias, "teacher_bias")))
    flat = lambda hidden: hidden.reshape(-1, hidden.shape[-1])  # noqa: E731
    tensors = (flat(student_hidden), student_weight, student_bias, flat(teacher[0]), *teacher[1:])
    options = (args.temperature, args.vocab_size, chunk_size, args.backend)
    return LinearCall(tensors, args.target, args.mask, options, lead_shape, shards)


class LinearSparseCall(NamedTuple):
    """The validated inputs of ``fused_linear_sparse_divergence``, in its custom op's argument order."""

    student: tuple  # the flattened hidden states [N, H], the weight [V, H], the bias [V] or None
    ids: torch.Tensor  # [N, K], int32 or int64
    logprobs: torch.Tensor  # [N, K], detached
    mask: Optional[torch.Tensor]  # [N] bool
    options: tuple  # (temperature, vocab_size, chunk_size: 0 for the default, backend)
    lead_shape: torch.Size


def validate_linear_sparse(
    student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, mask, temperature, vocab_size,
    chunk_size, backend, tail: str, shards: Optional[VocabShards] = None,
) -> LinearSparseCall:
    """Check everything ``fused_linear_sparse_divergence`` takes: the student's projection as ``validate_linear``
    checks it, the sparse teacher as ``validate_sparse_teacher`` does (its ids against the weight's rows: the
    student's vocabulary; with ``shards``, this rank's rows, and the ids and ``vocab_size`` global)."""
    check_tail(tail)
    _check_projection("student", student_hidden, student_weight, student_bias)
    lead_shape = student_hidden.shape[:-1]
    _check_sparse_teacher_tensors(teacher_ids, teacher_logprobs, "student_hidden", student_hidden.device, lead_shape)
    chunk_size = 0 if chunk_size is None else as_int("chunk_size (tokens per chunk, or None)", chunk_size, 1)
    width = student_weight.shape[0]
    args = validate_token_args(
        lead_shape, student_hidden.device, compute_dtype(student_weight.dtype, teacher_logprobs.dtype),
        {"student_weight": width, "teacher_ids": width}, None, mask, temperature, vocab_size, backend,
        inputs="hidden states", shards=shards,
    )
    ids, logprobs = _sparse_teacher_rows(teacher_ids, teacher_logprobs, args)
    student = (student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias)
    return LinearSparseCall(student, ids, logprobs, args.mask, (args.temperature, args.vocab_size, chunk_size,
                                                                args.backend), lead_shape)
