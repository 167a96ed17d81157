"""The kernel resolver: one explicit table from ``(op, backend)`` to an implementation, and the
rule that turns ``(op, backend, device, shape bucket, eager | graph)`` into a callable.

Backends: ``reference`` (plain PyTorch, any device), ``triton``, ``cuda`` (the compiled
extension), and ``auto``: the backend the tuning table ``configs/<op>.json`` (written by
``fuselm bench kernels``) recorded as fastest for this GPU and bucket, else the first ready one
of cuda > triton > reference; inside the decode CUDA graphs on Hopper and newer, triton >
cuda > reference (there the Triton kernels chain with programmatic dependent launch and host
launch cost does not count). On a CPU device ``auto`` is always ``reference``.

Nothing registers itself: ``TABLE`` names the module and attribute of every implementation,
and an op module (with Triton) is imported, or the CUDA extension loaded (built just in time if
need be), only when one of its implementations is resolved.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Variant = Literal["eager", "graph"]
BACKENDS = ("reference", "triton", "cuda", "auto")
_EAGER_ORDER = ("cuda", "triton", "reference")
_GRAPH_ORDER = ("triton", "cuda", "reference")


@dataclass(frozen=True)
class Impl:
    """An implementation: ``attr`` of ``fuselm.kernels.<module>``, or with ``torch_op`` the
    torch op ``fuselm::<torch_op>`` that importing the module defines."""

    module: str
    attr: str = ""
    torch_op: str = ""

    @property
    def name(self) -> str:
        """How ``describe`` prints it."""
        return f"fuselm::{self.torch_op}" if self.torch_op else f"{self.module}.{self.attr}"


def _ops(module: str, reference: str, triton: str | None = None,
         cuda: str | None = None) -> dict[str, Impl]:
    impls = {"reference": Impl(module, attr=reference)}
    if triton:
        impls["triton"] = Impl(module, torch_op=triton)
    if cuda:
        impls["cuda"] = Impl(module, attr=cuda)
    return impls


TABLE: dict[str, dict[str, Impl]] = {
    "rms_norm": _ops("rms_norm", "rms_norm_ref", "rms_norm", "rms_norm_cuda"),
    "fused_add_rms_norm": _ops("rms_norm", "fused_add_rms_norm_ref", "fused_add_rms_norm",
                               "fused_add_rms_norm_cuda"),
    "silu_and_mul": _ops("silu_and_mul", "silu_and_mul_ref", "silu_and_mul",
                         "silu_and_mul_cuda"),
    "rotary_store_kv": _ops("rotary_store_kv", "rotary_store_kv_ref", "rotary_store_kv",
                            "rotary_store_kv_cuda"),
    "prefill_attention": _ops("prefill_attention", "prefill_attention_ref",
                              "prefill_attention"),
    "paged_attention": _ops("paged_attention", "paged_attention_ref", "paged_attention"),
    "gemv": _ops("gemv", "gemv_ref", "gemv"),
    "gemv_silu_mul": _ops("gemv", "gemv_silu_mul_ref", "gemv_silu_mul"),
    "vocab_embedding": _ops("vocab_embedding", "vocab_embedding_ref", "vocab_embedding"),
    "argmax": _ops("argmax", "argmax_ref", "argmax"),
    # FP8 quantization: references in fp8_matmul, the Triton kernels beside the fused norm
    **{op: {"reference": Impl("fp8_matmul", attr=f"{op}_ref"),
            "triton": Impl("rms_norm_quant", torch_op=op)}
       for op in ("quant_fp8_per_token", "quant_fp8_static", "quant_fp8_per_token_group")},
    "fp8_matmul": _ops("fp8_matmul", "fp8_matmul_ref", "fp8_matmul", "fp8_matmul_cuda"),
    "fp8_block_matmul": _ops("fp8_matmul", "fp8_block_matmul_ref", "fp8_block_matmul"),
    "fp8_w8a16_gemv": _ops("fp8_matmul", "fp8_w8a16_gemv_ref", "fp8_w8a16_gemv"),
    "rms_norm_quant_fp8": _ops("rms_norm_quant", "rms_norm_quant_fp8_ref",
                               "rms_norm_quant_fp8"),
    "int8_matmul": _ops("int8_matmul", "int8_matmul_ref", "int8_matmul"),
    "int4_matmul": _ops("int4_matmul", "int4_matmul_ref", "int4_matmul"),
    "gguf_matmul": _ops("gguf_matmul", "gguf_matmul_ref", "gguf_matmul"),
}


def _backend_ready(backend: str) -> bool:
    if backend == "triton":
        from fuselm.kernels.triton_utils import triton_available

        return triton_available()
    if backend == "cuda":
        from fuselm.kernels.extension import load_extension

        return load_extension() is not None
    return True


def _impls(op: str) -> dict[str, Impl]:
    impls = TABLE.get(op)
    if impls is None:
        raise KeyError(f"no kernel op {op!r}; known: {', '.join(sorted(TABLE))}")
    return impls


def available_backends(op: str) -> list[str]:
    """Backends of ``op`` that can run here (Triton importable, the extension loadable)."""
    return sorted(b for b in _impls(op) if _backend_ready(b))


def load(impl: Impl) -> Callable:
    """The callable ``impl`` names (imports its module)."""
    module = importlib.import_module(f"fuselm.kernels.{impl.module}")
    if impl.torch_op:
        return getattr(torch.ops.fuselm, impl.torch_op).default
    return getattr(module, impl.attr)


def tuned_backend(op: str, device: torch.device, bucket: str = "default") -> str | None:
    """The backend the tuning table recorded as fastest for this GPU (or one of its compute
    capability) and shape bucket, or None."""
    if device.type != "cuda":
        return None
    from fuselm.kernels.triton_utils import gpu_table_entry

    index = device.index if device.index is not None else torch.cuda.current_device()
    entry = gpu_table_entry(op, index)
    choice = entry.get(bucket, entry.get("default"))
    return choice.get("backend") if isinstance(choice, dict) else choice


def auto_order(device: torch.device, variant: Variant) -> tuple[str, ...]:
    """Backend order of ``auto`` without a tuning-table entry (see the module docstring)."""
    from fuselm.kernels._pdl import pdl_available

    if variant == "graph" and pdl_available(device):
        return _GRAPH_ORDER
    return _EAGER_ORDER


def resolve_backend(op: str, backend: str, device: torch.device, bucket: str = "default",
                    variant: Variant = "eager", fallback: bool = False) -> str:
    """The backend ``resolve`` takes (see there)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    impls = _impls(op)
    if fallback and backend in ("triton", "cuda") and not (
            backend in impls and _backend_ready(backend)):
        backend = "auto"
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        tuned = tuned_backend(op, device, bucket)
        if tuned in impls and _backend_ready(tuned):
            return tuned
        return next(b for b in auto_order(device, variant) if b in impls and _backend_ready(b))
    if backend not in impls or not _backend_ready(backend):
        raise ValueError(f"kernel backend {backend!r} is not available for op {op!r} here "
                         f"(available: {', '.join(available_backends(op))})")
    return backend


def resolve(op: str, backend: str, device: torch.device, bucket: str = "default",
            variant: Variant = "eager", fallback: bool = False) -> Callable:
    """The implementation of ``op`` for ``backend`` on ``device`` (``auto``: see the module
    docstring). ``fallback``: an op without the requested ``triton``/``cuda`` backend takes
    ``auto`` instead of raising (so ``--kernel-backend cuda`` runs CUDA kernels where they exist
    and the best others elsewhere)."""
    chosen = resolve_backend(op, backend, device, bucket, variant, fallback)
    return load(_impls(op)[chosen])
