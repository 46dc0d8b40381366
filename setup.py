"""Ships the kernel sources in ``csrc/`` inside the package (as ``minillm_kernels/csrc``), where the
just-in-time builds (``minillm_kernels/_build.py``) find them after a regular install; an editable
install reads them from the checkout."""
from setuptools import setup

setup(
    packages=["minillm_kernels", "minillm_kernels.ops", "minillm_kernels.csrc", "minillm_kernels.integrations",
              "minillm_kernels.training", "minillm_kernels.training.tiny"],
    package_dir={"minillm_kernels.csrc": "csrc"},
    package_data={
        "minillm_kernels": ["gpu_backend_choice.json"],
        "minillm_kernels.csrc": ["common/*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.cpp", "cuda/*.h"],
    },
)
