"""The CUDA kernels (``csrc/**/*.cu``) and their host side compile for the H100 (sm_90) without a GPU.

nvcc is called directly, as the JIT build would for an H100 (``-gencode=arch=compute_90,code=sm_90``,
C++20, -O3, torch's ``COMMON_NVCC_FLAGS``, which turn off the implicit half / bfloat16 conversions)
with torch's include directories, and compiles each ``.cu`` to an object file in a temporary folder,
all the selected ones at once (a run of one source's test compiles that source only). The host-side ``.cpp`` files of ``csrc/cuda`` (tensor checks, launches on the
current stream) go through nvcc too, which hands them to the host compiler with the CUDA headers; only
the pybind bindings (``bindings.cpp``, a minute and 3 GB for ``torch/extension.h``) are left to the
JIT build on a GPU machine (``minillm_kernels/_build.py``). With the CPU build of torch ``CUDA_HOME`` is
None and ``torch.utils.cpp_extension`` refuses ``.cu`` sources, hence no cpp_extension here.
Skipped where nvcc is not on the PATH.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc").rglob("*.cu")) + sorted(
    path for path in (ROOT / "csrc" / "cuda").glob("*.cpp") if path.name != "bindings.cpp"
)
NVCC_FLAGS = [
    "-gencode=arch=compute_90,code=sm_90",
    "-std=c++20",
    "-O3",
    "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
    "-Xcompiler",
    "-fPIC",
]


@pytest.fixture(scope="module")
def compile_logs(request, tmp_path_factory) -> dict[Path, tuple[int, str]]:
    """``{source: (nvcc's exit code, its output)}`` of the sources whose tests this session runs, compiled in
    parallel."""
    selected = [item.callspec.params["source"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "source" in item.callspec.params]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH: the CUDA sources cannot be compile-checked here")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    flags = [*NVCC_FLAGS, *COMMON_NVCC_FLAGS, *(f"-I{path}" for path in include_paths())]
    objects = tmp_path_factory.mktemp("cuda_objects")
    running = {
        source: subprocess.Popen(
            [nvcc, *flags, "-c", str(source), "-o", str(objects / f"{source.name}.o")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source in dict.fromkeys(selected)
    }
    return {source: (process.wait(timeout=600), process.communicate()[0]) for source, process in running.items()}


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "no .cu files under csrc/"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_cuda_source_compiles_for_sm90(compile_logs, source):
    returncode, output = compile_logs[source]
    assert returncode == 0, f"nvcc failed on {source.relative_to(ROOT)}:\n{output[-4000:]}"
