"""Kernels of the decoder's hot path, one op per module, each with a reference implementation.

Importing this package registers every op's backends; ``select(op, backend, device)`` picks one.
"""

from fuselm.kernels import (  # noqa: F401  (registration side effects)
    argmax,
    gemv,
    paged_attention,
    prefill_attention,
    rms_norm,
    rotary_store_kv,
    silu_and_mul,
    vocab_embedding,
)
from fuselm.kernels._registry import BACKENDS, available_backends, register, select

__all__ = ["BACKENDS", "available_backends", "register", "select"]
