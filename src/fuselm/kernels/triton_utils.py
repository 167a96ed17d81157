"""Shared helpers of the Triton and CUDA launchers: availability, the ``fuselm`` op library,
launch-config lookup in ``configs/``, and row flattening.

Nothing here launches a kernel; everything that a launcher calls per call is cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import cache
from pathlib import Path

import torch

from fuselm import envs

_CONFIG_DIR = Path(__file__).parent / "configs"

# One FRAGMENT per process is enough; every op module defines its schemas into it.
# (Kept alive here: a Library object that is garbage-collected unregisters its ops.)
FUSELM_LIB = torch.library.Library("fuselm", "FRAGMENT")


def is_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def triton_available() -> bool:
    """Triton is importable and has somewhere to run: a CUDA device or the interpreter."""
    if not (is_interpreting() or torch.cuda.is_available()):
        return False  # nowhere to run: do not pay for importing triton
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must not break ``import fuselm``
        return False
    return True


def triton_dispatch_keys() -> tuple[str, ...]:
    """Dispatch keys the Triton launchers are registered under: CUDA, plus CPU when interpreting."""
    return ("CUDA", "CPU") if is_interpreting() else ("CUDA",)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """Views ``x [..., hidden]`` as ``[num_rows, hidden]`` without copying (ValueError if it can't).

    The last dimension must be contiguous; rows may be strided (e.g. a slice of a wider tensor).
    """
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got {x.stride()}")
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(x.shape)} cannot be viewed as rows") from err


@cache
def _gpu_key(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index).replace(" ", "_")


@cache
def _config_table(op: str) -> dict:
    path = Path(envs.kernel_configs_dir() or _CONFIG_DIR) / f"{op}.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


CAPABILITY_KEY = "_capability"  # {gpu: "major.minor"} beside the GPUs' entries of a table


@cache
def gpu_table_entry(op: str, device_index: int) -> dict:
    """This GPU's entry ``{bucket: ...}`` of ``configs/<op>.json``; for a GPU the table has no
    entry for, the entry of a GPU of the same compute capability (an H200 takes an H100's),
    else {}."""
    table = _config_table(op)
    entry = table.get(_gpu_key(device_index))
    if entry is None:
        capability = "{}.{}".format(*torch.cuda.get_device_capability(device_index))
        same = [gpu for gpu, cap in sorted(table.get(CAPABILITY_KEY, {}).items())
                if cap == capability and gpu in table]
        entry = table[same[0]] if same else {}
    return entry if isinstance(entry, dict) else {}


@cache
def tuned_triton_config(op: str, bucket: str, device_type: str, device_index: int) -> dict:
    """Triton launch parameters ``fuselm bench kernels`` recorded for this GPU and bucket, or {}.

    Reads ``configs/<op>.json`` ``{gpu: {bucket: {"backend": ..., "triton": {...}}}}``
    (``gpu_table_entry``); cached, so a launcher pays one dict lookup per call after the first.
    """
    if device_type != "cuda":
        return {}
    entry = gpu_table_entry(op, device_index).get(bucket, {})
    triton_cfg = entry.get("triton", {}) if isinstance(entry, dict) else {}
    return dict(triton_cfg) if isinstance(triton_cfg, dict) else {}


def clear_config_caches() -> None:
    """Forgets the cached tables (the benchmark calls it after writing new ones)."""
    _config_table.cache_clear()
    gpu_table_entry.cache_clear()
    tuned_triton_config.cache_clear()


def patch_interpreter_range() -> None:
    """Lets Triton's CPU interpreter loop over a runtime bound (``range(0, ctx_len, BLOCK_N)``).

    The interpreter holds scalars as 1-element arrays and converts a range bound with ``int()``,
    which numpy >= 2.3 refuses for arrays of ndim > 0 (triton 3.6, numpy 2.4). Only under
    ``TRITON_INTERPRET=1``; idempotent. The attention kernels need runtime bounds (context lengths)
    and a ``for`` loop, not ``while``, so that the compiler pipelines it on the GPU.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_fuselm_range_patch", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fuselm_range_patch = True
    interpreter._patch_lang_tensor = patched
