"""Whether a GGUF model keeps its ggml blocks packed on the device
(``layers/quantization/gguf_packed.py``) or is dequantized at load.

Packed with ``--quantization gguf`` (also on a CPU, where the reference kernel dequantizes the
weights every call: slow, for the quality check), and by default on CUDA when the file's linear
weights are block-quantized; dequantized at load otherwise (a CPU's default: its float GEMV is
fast). The loader then reads the weights with ``GGUFCheckpoint.tensors(packed_linear=True)``.
"""

from __future__ import annotations

from collections import Counter

import torch

from fuselm.kernels.gguf_matmul import TYPE_IDS
from fuselm.layers.quantization.config import QuantizationConfig
from fuselm.loading.gguf import GGUFCheckpoint, hf_tensor_name


def packed_quantization(ckpt: GGUFCheckpoint, device: torch.device | str,
                        requested: str | None = None) -> QuantizationConfig | None:
    """The quantization a GGUF model runs with: packed blocks (method ``gguf``) with
    ``--quantization gguf`` (on a CPU too: the reference dequantizes per call, slow), or by
    default on CUDA when the file's linear weights are block-quantized; None (the weights are
    dequantized at load, as on a CPU by default) otherwise."""
    if requested not in (None, "gguf"):
        return None  # another --quantization: the caller's to accept or refuse
    linear = Counter(info.ggml_type for name, info in ckpt.reader.tensors.items()
                     if hf_tensor_name(name).endswith("_proj.weight"))
    blocks = Counter({t: c for t, c in linear.items() if t in TYPE_IDS})
    if requested is None and (torch.device(device).type != "cuda" or not blocks):
        return None
    main = (blocks or linear or Counter({"F32": 1})).most_common(1)[0][0]
    return QuantizationConfig("gguf", source="gguf", bits=8 if main == "Q8_0" else 4,
                              checkpoint_format=main)
