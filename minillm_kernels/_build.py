"""Just-in-time builds of the kernels in ``csrc/`` with ninja: ``load_cpu_extension`` (``csrc/cpu``) and
``load_cuda_extension`` (``csrc/cuda``), each compiled once per process (torch caches the build across processes,
keyed by the extension's name, sources and flags) and returned as a module with the ``Kernels`` of ``backends.py``
under the names the bindings give them (``forward``, ``backward``, ``divergence_forward``, ...). A build that fails
warns once, naming the compiler's first error, and returns None: its backend is then not usable. A build killed
mid-way leaves torch's ``lock`` file, on which every later build would wait for ever: the next build, holding an OS
lock of its own, removes it with a warning (``_build_lock``).

The CPU build and the instruction set. torch's build cache is keyed by name, sources and flags, not by the CPU. A
``-march=native`` build made on an AVX-512 machine and found in a cache shared with an older machine (one home
directory or image) would crash that machine with an illegal instruction. So the build targets the host's x86-64
micro-architecture level (``x86-64-v2``, ``-v3``: AVX2 and FMA, ``-v4``: AVX-512) with an explicit
``-march=<level>``, and the extension's name carries the level (``minillm_kernels_cpu_x86_64_v4``): a shared cache
holds one build per level, and a machine only ever loads the build for its own level. The level is the highest whose
feature macros the compiler defines for ``-march=native`` (so it accounts for what the OS enables, e.g. AVX-512
state). Other architectures get the compiler's baseline for the machine (no ``-march``), named by
``platform.machine()``. ``$MINILLM_CPU_ISA_LEVEL`` names a lower x86-64 level to build and run instead, to
measure or test that build on a newer machine (the ``x86-64-v3`` AVX2 build on an AVX-512 one).

``-fno-trapping-math``: without it gcc does not if-convert a float comparison (it could trap), and below AVX-512, whose
masked instructions need no if-conversion, every per-column loop stayed scalar.

The CUDA build: none without a GPU; with one, for the current device's compute capability (``sm_90`` on an H100),
with ``nvcc`` (``CUDA_HOME``).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import platform
import re
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

# No -ffast-math / -ffinite-math-only: the kernels must handle -inf logits.
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
ISA_LEVEL_ENV = "MINILLM_CPU_ISA_LEVEL"
# No --use_fast_math: the kernels rely on IEEE exp/log/division for -inf logits and choose their own fast exp.
_CUDA_CFLAGS = ["-O3"]
# The CPU kernel's translation units (csrc/cpu). The divergence family's forward has a unit per divergence
# (divergence_forward_rows.h): each compiles in seconds, and a change to one divergence's code rebuilds its unit only.
CPU_UNITS = ("reverse_kld.cpp", "divergence_forward.cpp", "divergence_forward_forward_kl.cpp",
             "divergence_forward_jsd.cpp", "divergence_forward_skew_forward_kl.cpp",
             "divergence_forward_skew_reverse_kl.cpp", "divergence_forward_tvd.cpp", "divergence_backward.cpp",
             "sparse_forward.cpp", "sparse_backward.cpp", "bindings.cpp")

X86_64_BASELINE = "x86-64"
# The x86-64 micro-architecture levels (psABI), lowest first, by the feature macros gcc and clang define for them.
X86_64_LEVEL_MACROS = {
    "x86-64-v2": frozenset({"__SSE3__", "__SSSE3__", "__SSE4_1__", "__SSE4_2__", "__POPCNT__"}),
    "x86-64-v3": frozenset({"__AVX__", "__AVX2__", "__BMI__", "__BMI2__", "__F16C__", "__FMA__", "__LZCNT__",
                            "__MOVBE__", "__XSAVE__"}),
    "x86-64-v4": frozenset({"__AVX512F__", "__AVX512BW__", "__AVX512CD__", "__AVX512DQ__", "__AVX512VL__"}),
}
X86_64_LEVELS = (X86_64_BASELINE, *X86_64_LEVEL_MACROS)  # lowest first


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
        from torch.utils.cpp_extension import _get_build_directory, load

        build_directory = Path(load_kwargs.get("build_directory") or _get_build_directory(name, verbose=False))
        with _build_lock(build_directory):
            return load(name=name, sources=[str(s) for s in sources], **load_kwargs)
    except Exception as exc:  # noqa: BLE001 (a compiler, ninja or import failure)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        # The first line of a failed build is the compile command; the compiler's diagnostic says more.
        reason = next((line for line in lines if "error:" in line), lines[0]).strip()[:300]
        warnings.warn(
            f"minillm_kernels: {what} could not be built ({reason}); {instead}.", RuntimeWarning, stacklevel=3
        )
        return None


@contextlib.contextmanager
def _build_lock(build_directory: Path) -> Iterator[None]:
    """Holds an OS lock on ``build_directory`` (released by the OS if the process dies) and, under it, removes the
    ``lock`` file a killed build left behind.

    torch's ``load`` marks a build in progress with a ``lock`` file that only the build itself removes: after a build
    killed mid-way (a timeout, Ctrl-C twice), every later ``load`` of the extension waited for it forever, without a
    word. Under this lock no other process of ours is building, so a ``lock`` file there is such a leftover."""
    build_directory.mkdir(parents=True, exist_ok=True)
    with open(build_directory / "minillm_build.flock", "a") as handle:  # (closing it releases the lock)
        fcntl.flock(handle, fcntl.LOCK_EX)
        leftover = build_directory / "lock"
        if leftover.exists():
            warnings.warn(f"minillm_kernels: removed {leftover}, left by a build that did not finish.",
                          RuntimeWarning, stacklevel=4)
            leftover.unlink()
        yield


# ---------------------------------------------------------------------------------------------------------------
# csrc/cpu
# ---------------------------------------------------------------------------------------------------------------
def isa_level(macros: Iterable[str], machine: str) -> str:
    """The instruction-set level to build for, from the compiler's predefined macros for ``-march=native``.

    x86-64 (``__x86_64__`` defined): the highest level of ``X86_64_LEVEL_MACROS`` whose macros, and those of
    every level below it, are all defined, else ``"x86-64"``. Any other architecture: ``machine`` itself.
    """
    macros = frozenset(macros)
    if "__x86_64__" not in macros:
        return machine
    level, required = X86_64_BASELINE, frozenset()
    for name, features in X86_64_LEVEL_MACROS.items():
        required |= features
        if not required <= macros:
            break
        level = name
    return level


def build_config(level: str) -> tuple[str, list[str]]:
    """``(extension name, compiler flags)`` of the CPU build for an instruction-set level from ``isa_level``."""
    name = "minillm_kernels_cpu_" + re.sub(r"\W", "_", level)
    if level == X86_64_BASELINE or level in X86_64_LEVEL_MACROS:
        return name, [*_CFLAGS, f"-march={level}"]
    return name, list(_CFLAGS)


def _native_macros(compiler: str) -> frozenset[str]:
    """The macros ``compiler`` predefines for ``-march=native`` (none if it cannot say)."""
    try:
        done = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                              capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define "))


def chosen_isa_level(native: str, requested: str | None) -> str:
    """The level to build for: ``native`` (``isa_level``'s), or ``requested`` (``$MINILLM_CPU_ISA_LEVEL``) if set, which
    must be an x86-64 level this machine runs, ``native`` or below it."""
    if not requested:
        return native
    runnable = X86_64_LEVELS[:X86_64_LEVELS.index(native) + 1] if native in X86_64_LEVELS else ()
    if requested not in runnable:
        raise ValueError(f"{ISA_LEVEL_ENV}={requested!r}: this machine ({native}) runs "
                         f"{', '.join(runnable) or 'no x86-64 level'}; unset it to build for the machine's own level")
    return requested


@functools.cache
def host_isa_level() -> str:
    """The level this machine's build targets (``chosen_isa_level``), asking the compiler the JIT build uses (``$CXX``,
    else ``c++``) for the machine's own."""
    native = isa_level(_native_macros(os.environ.get("CXX", "c++")), platform.machine())
    return chosen_isa_level(native, os.environ.get(ISA_LEVEL_ENV))


@functools.cache
def load_cpu_extension() -> ModuleType | None:
    """Build (or load the cached build of) the CPU extension for this machine's instruction-set level; None, with
    one warning, if that fails."""
    cpu_dir = csrc_dir() / "cpu"
    name, cflags = build_config(host_isa_level())
    return build_extension(
        name,
        [cpu_dir / unit for unit in CPU_UNITS],
        what="the CPU kernel",
        instead="using the reference backend instead",
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
    )


# ---------------------------------------------------------------------------------------------------------------
# csrc/cuda
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def load_cuda_extension() -> ModuleType | None:
    """Build (or load the cached build of) the CUDA extension, whose module also has ``forward_out`` /
    ``backward_out`` (the reverse KL into given outputs); None without a GPU, or with one warning if the build
    fails."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    cuda_dir = csrc_dir() / "cuda"
    return build_extension(
        f"minillm_kernels_cuda_sm{arch}",
        [cuda_dir / "reverse_kld.cu", cuda_dir / "reverse_kld.cpp", cuda_dir / "divergence.cu",
         cuda_dir / "divergence.cpp", cuda_dir / "sparse.cu", cuda_dir / "sparse.cpp", cuda_dir / "bindings.cpp"],
        what="the CUDA kernel",
        instead="the 'cuda' backend is not available (CUDA tensors use Triton)",
        extra_cflags=["-O3"],
        # Naming the architecture stops torch from adding its own list (and PTX) for every visible GPU.
        extra_cuda_cflags=[*_CUDA_CFLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"],
    )
