"""Just-in-time builds of the kernels in ``csrc/`` with ninja, shared by the ``cpu`` and ``cuda`` loaders.

``build_extension`` compiles an extension once (torch caches the build across processes, keyed by the name, sources
and flags, not by the machine: what depends on the host, such as the CPU's instruction set, must be in the name, as
``cpu.py`` does) and returns the module; if the build fails, it warns once, naming the compiler's first error, and
returns None, so that the caller's backend is simply not available.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType


def csrc_dir() -> Path:
    """``csrc/`` at the repository root (editable install), else ``minillm_kernels/csrc`` (package data)."""
    package = Path(__file__).resolve().parent
    candidates = (package.parent / "csrc", package / "csrc")
    return next((c for c in candidates if (c / "common").is_dir()), candidates[0])


def build_extension(name: str, sources: list[Path], what: str, instead: str, **load_kwargs) -> ModuleType | None:
    """``torch.utils.cpp_extension.load(name, sources, **load_kwargs)``, or None with one warning.

    ``what`` names the build in the warning ("the CPU kernel") and ``instead`` says what is used in its place.
    """
    try:
        from torch.utils.cpp_extension import load

        return load(name=name, sources=[str(s) for s in sources], **load_kwargs)
    except Exception as exc:  # noqa: BLE001 (a compiler, ninja or import failure)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        # The first line of a failed build is the compile command; the compiler's diagnostic says more.
        reason = next((line for line in lines if "error:" in line), lines[0]).strip()[:300]
        warnings.warn(
            f"minillm_kernels: {what} could not be built ({reason}); {instead}.", RuntimeWarning, stacklevel=3
        )
        return None
