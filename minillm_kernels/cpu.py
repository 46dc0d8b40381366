"""The ``"cpu"`` backend's loader: builds the fused C++ kernels (``csrc/cpu``) just-in-time.

``load_extension()`` compiles the extension once per process (torch caches the build across processes)
and returns the module, with ``forward`` and ``backward``; if the build fails it warns once and returns
None, and the reference backend is used instead.
"""
from __future__ import annotations

import functools
from types import ModuleType

from minillm_kernels._jit import build_extension, csrc_dir

# No -ffast-math / -ffinite-math-only: the kernels must handle -inf logits.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


@functools.cache
def load_extension() -> ModuleType | None:
    """Build (or load the cached build of) the CPU extension; None, with one warning, if that fails."""
    cpu_dir = csrc_dir() / "cpu"
    return build_extension(
        "minillm_kernels_cpu",
        [cpu_dir / "reverse_kld.cpp", cpu_dir / "bindings.cpp"],
        what="the CPU kernel",
        instead="using the reference backend instead",
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
    )
