"""Backend registry: which implementation of each op runs, chosen once when a model is built.

Backends: ``reference`` (plain PyTorch, any device), ``triton``, ``cuda`` (compiled extension),
and ``auto`` = the fastest backend the tuning table in ``configs/<op>.json`` recorded for this
GPU, else the first available of cuda > triton > reference (triton > cuda for the decode CUDA
graphs on Hopper and newer, where the Triton kernels chain with programmatic dependent launch).
On a CPU device ``auto`` is always ``reference``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BACKENDS = ("reference", "triton", "cuda", "auto")
_PREFERENCE = ("cuda", "triton", "reference")

# op name -> backend -> implementation. Filled by the op modules at import time.
_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Makes ``fn`` the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[:-1]}")
    _IMPLS.setdefault(op, {})[backend] = fn


def available_backends(op: str) -> list[str]:
    """Backends registered for ``op``."""
    return sorted(_IMPLS.get(op, {}))


def _preference(device: torch.device, for_graphs: bool) -> tuple[str, ...]:
    """Backend order for ``auto`` without a tuning-table entry. Inside CUDA graphs on Hopper and
    newer, Triton first: its kernels chain with programmatic dependent launch and host launch
    cost does not count there. Elsewhere CUDA first (its launches cost the host less)."""
    from fuselm.kernels._pdl import pdl_available

    if for_graphs and pdl_available(device):
        return ("triton", "cuda", "reference")
    return _PREFERENCE


def tuned_backend(op: str, device: torch.device, bucket: str = "default") -> str | None:
    """The backend ``fuselm bench kernels`` recorded as fastest for this GPU (or one of its
    compute capability) and shape bucket."""
    if device.type != "cuda":
        return None
    from fuselm.kernels._triton_utils import gpu_table_entry

    index = device.index if device.index is not None else torch.cuda.current_device()
    entry = gpu_table_entry(op, index)
    choice = entry.get(bucket, entry.get("default"))
    return choice.get("backend") if isinstance(choice, dict) else choice


def select(op: str, backend: str, device: torch.device, bucket: str = "default",
           for_graphs: bool = False) -> Callable:
    """Returns the implementation of ``op`` to use on ``device`` for the requested backend
    (``for_graphs``: for the decode CUDA graphs, see ``_preference``)."""
    from fuselm import kernels  # noqa: F401  (imports every op module, filling _IMPLS)

    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    if device.type != "cuda" and backend == "auto":
        return impls["reference"]
    if backend == "auto":
        tuned = tuned_backend(op, device, bucket)
        if tuned in impls:
            return impls[tuned]
        backend = next(b for b in _preference(device, for_graphs) if b in impls)
    if backend not in impls:
        raise ValueError(
            f"backend {backend!r} is not available for op {op!r} here "
            f"(available: {', '.join(sorted(impls))})"
        )
    return impls[backend]


def select_preferred(op: str, backend: str, device: torch.device,
                     bucket: str = "default", for_graphs: bool = False) -> Callable:
    """Like ``select``, but an op without the requested backend falls back to ``auto`` (so
    ``--kernel-backend cuda`` runs CUDA kernels where they exist and the best others elsewhere)."""
    from fuselm import kernels  # noqa: F401  (imports every op module, filling _IMPLS)

    if backend in ("triton", "cuda") and backend not in _IMPLS.get(op, {}):
        return select(op, "auto", device, bucket, for_graphs)
    return select(op, backend, device, bucket, for_graphs)
