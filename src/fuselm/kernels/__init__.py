"""Kernels of the decoder's hot path, one op per module, each with a reference implementation.

``resolver`` maps ``(op, backend, device, shape bucket, eager | graph)`` to a callable from one
explicit table; ``KernelSet`` holds every choice a model makes. Importing this package imports no
op module, no Triton and no CUDA extension: those load when a kernel is first resolved.
"""

from fuselm.kernels.kernel_set import KernelChoice, KernelSet
from fuselm.kernels.resolver import BACKENDS, TABLE, available_backends, resolve

__all__ = ["BACKENDS", "TABLE", "KernelChoice", "KernelSet", "available_backends", "resolve"]
