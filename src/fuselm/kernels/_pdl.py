"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-path Triton kernels.

A kernel launched with PDL may start while its predecessor on the stream is still running: its
programs wait (``griddepcontrol.wait``) until the predecessor finished and flushed its memory
before touching any tensor another kernel writes, then let their own successor launch. Inside a
decode CUDA graph this hides most of the ~1 us gap between the ~300 small kernels of a step, and
``gemv`` streams its weights (which no kernel writes) before it waits.

Rule for every kernel that takes ``USE_PDL``: call ``pdl_wait_then_release(USE_PDL)`` before
its first load or store of activations (weights may be read before it).
"""

from __future__ import annotations

from functools import cache

import torch

from fuselm import envs
from fuselm.kernels import triton_utils


@cache
def _enabled(device_index: int) -> bool:
    if triton_utils.is_interpreting() or not envs.pdl_enabled():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL (sm_90+, ``FUSELM_PDL`` not 0)."""
    return t.is_cuda and _enabled(t.device.index or 0)


def launch_args(t: torch.Tensor) -> dict[str, bool]:
    """The kernel's ``USE_PDL`` and the launcher's ``launch_pdl``, for kernels on ``t``'s device."""
    pdl = use_pdl(t)
    return {"USE_PDL": pdl, "launch_pdl": pdl}


def pdl_available(device: torch.device) -> bool:
    """Whether Triton kernels on ``device`` chain with PDL (the registry prefers them there)."""
    return device.type == "cuda" and triton_utils.triton_available() and _enabled(
        device.index if device.index is not None else torch.cuda.current_device())


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def pdl_wait_then_release(USE_PDL: tl.constexpr):
        """Waits for the previous kernel's results, then lets the next kernel launch."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
