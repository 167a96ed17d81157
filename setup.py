"""Build script: always the pure-Python package; the CUDA extension ``fuselm._C`` when it can be.

The extension is compiled ahead of time when the build sees a CUDA build of torch and nvcc
(``pip install -e . --no-build-isolation``, or ``python setup.py build_ext --inplace``), for
sm_80, sm_89 and sm_90a; ninja parallelises it and honours ``MAX_JOBS``. Otherwise (a CPU-only
torch, no nvcc, or an isolated build environment without torch) the package installs without it,
and ``fuselm.kernels._extension`` builds it just in time on a machine with a GPU.
``FUSELM_SKIP_CUDA_BUILD=1`` skips the extension outright.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

CSRC = Path("src") / "fuselm" / "kernels" / "csrc"
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_89,code=sm_89",
    "-gencode=arch=compute_90a,code=sm_90a",
]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *GENCODE]


def cuda_extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for the extension, or {} when it cannot be built here."""
    if os.environ.get("FUSELM_SKIP_CUDA_BUILD", "0") == "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # isolated build env or no torch: pure-Python install
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    sources = sorted(p.as_posix() for p in CSRC.glob("*.cu")) + [(CSRC / "bindings.cpp").as_posix()]
    extension = CUDAExtension(
        name="fuselm._C",
        sources=sources,
        include_dirs=[str(CSRC.resolve())],
        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension_kwargs())
