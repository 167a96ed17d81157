"""The compiled CUDA extension: ``fuselm._C`` when built at install, else built just in time.

``load_extension()`` (called by the kernel resolver when a CUDA implementation is first asked
for, never at import) returns the ``torch.ops.fuselm_C`` namespace, or None when there is no CUDA
device, no CUDA build of torch, no nvcc or the build fails (with a warning); it never raises.
The just-in-time build (``torch.utils.cpp_extension.load``, ninja) targets the current GPU's
architecture only (sm_90a on Hopper), is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) and honours ``MAX_JOBS``; a first build takes about a minute.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).parent / "csrc"


def sources() -> list[Path]:
    """Every translation unit of the extension: the kernels (``*.cu``) and ``bindings.cpp``."""
    return sorted(CSRC_DIR.glob("*.cu")) + [CSRC_DIR / "bindings.cpp"]


def arch_gencode(major: int, minor: int) -> str:
    """nvcc ``-gencode`` flag for one architecture; Hopper gets its ``a`` variant (wgmma)."""
    suffix = "a" if (major, minor) == (9, 0) else ""
    return f"-gencode=arch=compute_{major}{minor}{suffix},code=sm_{major}{minor}{suffix}"


NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


@cache
def _load() -> tuple[object | None, str]:
    if torch.version.cuda is None:
        return None, "torch has no CUDA"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    spec = importlib.util.find_spec("fuselm._C")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
            return _with_fakes(torch.ops.fuselm_C), f"aot:{spec.origin}"
        except Exception as err:  # e.g. built against another torch: fall back to JIT
            warnings.warn(f"fuselm._C failed to load ({err}); trying a JIT build", stacklevel=2)
    ops, status = _jit_build()
    return (_with_fakes(ops) if ops is not None else None), status


# The extension's ops that only write their arguments; each gets a fake (meta) implementation so
# that torch.compile and CUDA graph tracing see them.
VOID_OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_store_kv", "int4_gemv",
            "int8_gemv")


def _with_fakes(ops):
    for op in VOID_OPS:
        torch.library.register_fake(f"fuselm_C::{op}")(_void)
    return ops


def _jit_build() -> tuple[object | None, str]:
    try:
        from torch.utils import cpp_extension
    except Exception as err:
        return None, f"torch.utils.cpp_extension unavailable: {err}"
    if cpp_extension.CUDA_HOME is None:
        return None, "no nvcc (CUDA_HOME not found)"
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (needed for the JIT build)"
    major, minor = torch.cuda.get_device_capability()
    name = f"fuselm_C_sm{major}{minor}"
    logger.info("building the fuselm CUDA extension %s (cached after the first time)", name)
    try:
        path = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources()],
            extra_cflags=["-O3"],
            extra_cuda_cflags=[*NVCC_FLAGS, arch_gencode(major, minor)],
            extra_include_paths=[str(CSRC_DIR)],
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:
        warnings.warn(f"fuselm CUDA extension JIT build failed: {err}", stacklevel=3)
        return None, f"jit build failed: {str(err).splitlines()[0] if str(err) else err!r}"
    return torch.ops.fuselm_C, f"jit:{path or name}"


def load_extension():
    """``torch.ops.fuselm_C`` when the extension is loaded, else None. Cached; never raises."""
    try:
        return _load()[0]
    except Exception as err:  # a broken CUDA setup must not break ``import fuselm``
        warnings.warn(f"fuselm CUDA extension unavailable: {err}", stacklevel=2)
        return None


def loaded_extension():
    """``torch.ops.fuselm_C`` when ``load_extension`` has already loaded it, else None (never
    starts a build: for heuristics that prefer a CUDA kernel only where it is at hand)."""
    if _load.cache_info().currsize == 0:
        return None
    return load_extension()


def extension_status() -> str:
    """How the extension was obtained (``aot:<path>``, ``jit:<name>``) or why it is missing."""
    try:
        return _load()[1]
    except Exception as err:
        return f"error: {err}"


def _void(*args, **kwargs) -> None:
    return None
