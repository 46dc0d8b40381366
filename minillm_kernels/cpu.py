"""The ``"cpu"`` backend's loader: builds the fused C++ kernels (``csrc/cpu``) just-in-time.

``load_extension()`` compiles the extension once per process (torch caches the build across processes)
and returns the module, with ``forward`` and ``backward``; if the build fails it warns once and returns
None, and the reference backend is used instead.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from types import ModuleType

# No -ffast-math / -ffinite-math-only: the kernels must handle -inf logits.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


def _csrc_dir() -> Path:
    """``csrc/`` at the repository root (editable install), else ``minillm_kernels/csrc`` (package data)."""
    package = Path(__file__).resolve().parent
    candidates = (package.parent / "csrc", package / "csrc")
    return next((c for c in candidates if (c / "cpu").is_dir()), candidates[0])


@functools.cache
def load_extension() -> ModuleType | None:
    """Build (or load the cached build of) the CPU extension; None, with one warning, if that fails."""
    try:
        from torch.utils.cpp_extension import load

        cpu_dir = _csrc_dir() / "cpu"
        return load(
            name="minillm_kernels_cpu",
            sources=[str(cpu_dir / "reverse_kld.cpp"), str(cpu_dir / "bindings.cpp")],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # noqa: BLE001 (a compiler, ninja or import failure)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        # The first line of a failed build is the compile command; the compiler's diagnostic says more.
        reason = next((line for line in lines if "error:" in line), lines[0]).strip()[:300]
        warnings.warn(
            f"minillm_kernels: the CPU kernel could not be built ({reason}); "
            "using the reference backend instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
