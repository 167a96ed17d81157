"""Linear methods (dense, int8, int4, fp8, GGUF packed) and the quantization config.

``base.LinearMethod`` is the seam; ``linear_method`` picks a layer's method from the model's
``QuantizationConfig``, ``lm_head_method`` the LM head's, and ``process_weights_after_loading``
runs every method's post-load step (online quantization) once the checkpoint is in. Submodules
are imported inside the functions, so ``fuselm.config`` reads ``config.QuantizationConfig``
without importing torch layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from fuselm.kernels.kernel_set import KernelSet
    from fuselm.layers.quantization.base import LinearMethod
    from fuselm.layers.quantization.config import QuantizationConfig


def linear_method(quant: QuantizationConfig | None, kernels: KernelSet,
                  names: tuple[str, ...] = ()) -> LinearMethod:
    """The method of a linear layer holding the checkpoint modules ``names`` (q, k and v of a
    merged layer): dense without quantization or when ``quant.ignore`` lists them all; a
    merged layer partly ignored is refused (its parts would need two layouts)."""
    from fuselm.layers.quantization.dense import DenseLinearMethod

    if quant is None:
        return DenseLinearMethod(kernels)
    skipped = [n for n in names if quant.skips(n)]
    if skipped and len(skipped) == len(names):
        return DenseLinearMethod(kernels)
    if skipped:
        raise ValueError(f"the quantization config ignores {skipped} but not the rest of "
                         f"{list(names)}, which fuselm runs as one layer")
    if quant.method == "int8":
        from fuselm.layers.quantization.int8 import Int8LinearMethod

        return Int8LinearMethod(kernels, quant)
    if quant.method == "int4":
        from fuselm.layers.quantization.int4 import Int4LinearMethod

        return Int4LinearMethod(kernels, quant)
    if quant.method == "fp8":
        from fuselm.layers.quantization.fp8 import Fp8LinearMethod

        return Fp8LinearMethod(kernels, quant)
    from fuselm.layers.quantization import gguf_packed  # owned by the GGUF kernels

    return gguf_packed.GGUFPackedLinearMethod(kernels, quant)


def lm_head_method(quant: QuantizationConfig | None, kernels: KernelSet) -> LinearMethod | None:
    """The LM head's method: int8 per channel, quantized after loading, where
    ``quant.lm_head_bits`` is 8 (int4 and int8); None keeps today's float head (fp8: measured
    nowhere faster yet, so bf16)."""
    if quant is None or quant.lm_head_bits != 8:
        return None
    from fuselm.layers.quantization.config import QuantizationConfig
    from fuselm.layers.quantization.int8 import Int8LinearMethod

    return Int8LinearMethod(kernels, QuantizationConfig.online("int8"))


def process_weights_after_loading(model: nn.Module) -> None:
    """Runs every layer's ``method.process_weights_after_loading`` (once, after loading)."""
    from fuselm.layers.quantization.base import LinearMethod

    for module in model.modules():
        method = getattr(module, "method", None)
        if isinstance(method, LinearMethod):
            method.process_weights_after_loading(module)
    import torch

    if torch.cuda.is_available() and any(p.is_cuda for p in model.parameters()):
        torch.cuda.empty_cache()  # the float weights online quantization freed: KV cache room


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes one decode step reads from the linear layers and the LM head (every
    ``method``-holding module's ``weight_bytes``, a float LM head's weight), per rank."""
    from fuselm.layers.quantization.base import LinearMethod, tensor_bytes

    total = 0
    for name, module in model.named_modules():
        method = getattr(module, "method", None)
        if isinstance(method, LinearMethod):
            total += method.weight_bytes(module)
        elif name.endswith("lm_head") and hasattr(module, "weight"):
            total += tensor_bytes(module.weight)
    return total


def describe(model: nn.Module) -> str:
    """The methods the model's layers run, e.g. ``int4 g128 zp (w4a16) x 14, lm_head int8``."""
    from collections import Counter

    from fuselm.layers.quantization.base import LinearMethod

    counts: Counter[str] = Counter()
    for name, module in model.named_modules():
        method = getattr(module, "method", None)
        if isinstance(method, LinearMethod):
            label = method.describe()
            counts["lm_head " + label if name.endswith("lm_head") else label] += 1
    return ", ".join(f"{label} x {n}" for label, n in sorted(counts.items()))
