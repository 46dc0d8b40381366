"""Checks of the scalar arguments every public function shares: one place for "a number in a range".

Python numbers, NumPy scalars (``np.int64(50)``, ``np.float32(0.7)``) and 0-dim tensors are accepted and turned
into ``int`` / ``float``; anything else is a ``TypeError`` that names the argument and the type wanted, and a value
out of range a ``ValueError`` that gives the range. The checks are written with comparisons only (no
``math.isfinite``), so that ``torch.compile(dynamic=True)`` traces them when a float argument is symbolic. Under
torch.compile a 0-dim tensor is refused (its value is known only when the graph runs, and no check or kernel can take
it as a number then), and a failing check cannot raise while tracing (the graph breaks): where a bad value is a
caller's runtime input (beta, skew), the ops check it again when the graph runs (``ops/divergence.py``).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch


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
