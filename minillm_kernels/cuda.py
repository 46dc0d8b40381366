"""The ``"cuda"`` backend's loader: builds the fused CUDA kernels (``csrc/cuda``) just-in-time for this GPU.

``load_extension()`` returns None without a GPU (the backend is simply not available there). With one, it
compiles the extension once per process for the current device's compute capability (``sm_90`` on an H100;
torch caches the build across processes, one per capability) and returns the module, with ``forward``,
``backward``, ``divergence_forward``, ``divergence_backward``, ``sparse_divergence_forward``,
``sparse_divergence_backward`` (the CPU extension's signatures) and ``forward_out`` / ``backward_out`` (into given outputs). It
needs ``nvcc`` (``CUDA_HOME``) and ninja; if the build fails it warns once and returns None, and Triton is used
on CUDA tensors instead.
"""
from __future__ import annotations

import functools
from types import ModuleType

from minillm_kernels._jit import build_extension, csrc_dir

# No --use_fast_math: the kernels rely on IEEE exp/log/division for -inf logits and choose their own fast exp.
_CUDA_CFLAGS = ["-O3"]


@functools.cache
def load_extension() -> ModuleType | None:
    """Build (or load the cached build of) the CUDA extension; None without a GPU, or with one warning if the
    build fails."""
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
