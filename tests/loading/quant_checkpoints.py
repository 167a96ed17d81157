"""Tiny quantized checkpoints written in the real Hugging Face formats, from each format's
specification (compressed-tensors through its own package's compressors).

Every quantizer works in float64 and returns the exact float weight its stored tensors stand
for (``LayerTensors.dequantized``), computed from the integers and scales it chose: the
independent reference the tests compare fuselm's conversion with. ``write_quantized`` turns a
float tiny checkpoint into a quantized one plus its dequantized float twin.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packer: field i holds column [i]


@dataclass
class LayerTensors:
    """One quantized linear: its checkpoint tensors (suffix -> tensor) and the float64
    ``[N, K]`` weight they encode."""

    tensors: dict[str, torch.Tensor]
    dequantized: torch.Tensor


# -- integer quantization (float64 min-max) ---------------------------------------------------

def int4_groups(w: torch.Tensor, group: int | None, sym: bool, scale_dtype: torch.dtype,
                min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int64 [N, K] in 0..15, scales [N, K / G] scale_dtype, zeros int64 [N, K / G]);
    symmetric: zero 8. ``group`` None: one group per row."""
    n, k = w.shape
    g = k if group is None else group
    wg = w.double().reshape(n, k // g, g)
    if sym:
        scales = (wg.abs().amax(-1) / 7.0).clamp_min(1e-6).to(scale_dtype)
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scales = ((hi - lo) / 15.0).clamp_min(1e-6).to(scale_dtype)
        zeros = torch.round(-lo / scales.double()).clamp(min_zero, 15).to(torch.int64)
    s = scales.double().unsqueeze(-1)
    q = torch.round(wg / s + zeros.unsqueeze(-1)).clamp(0, 15).to(torch.int64)
    return q.reshape(n, k), scales, zeros


def int4_dequantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """float64 ``(q - zero) * scale`` with each group's zero and scale repeated."""
    g = q.shape[1] // scales.shape[1]
    return (q - zeros.repeat_interleave(g, 1)).double() * \
        scales.double().repeat_interleave(g, 1)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_fields(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None
                ) -> torch.Tensor:
    """int64 ``[R, C]`` unsigned fields -> int32 ``[R, C * bits / 32]``: field ``i`` (bits
    ``bits * i`` up) of word ``c`` holds value ``c * per + order[i]`` (default: ``+ i``)."""
    per = 32 // bits
    r, c = values.shape
    grouped = values.reshape(r, c // per, per)
    words = torch.zeros(r, c // per, dtype=torch.int64)
    for field in range(per):
        column = order[field] if order is not None else field
        words |= grouped[:, :, column] << (bits * field)
    return to_int32(words)


# -- formats ----------------------------------------------------------------------------------

def awq_layer(w: torch.Tensor, group: int) -> LayerTensors:
    """AWQ GEMM: qweight [K, N/8] (interleaved), qzeros [K/G, N/8], scales fp16 [K/G, N]."""
    q, s, z = int4_groups(w, group, sym=False, scale_dtype=torch.float16)
    return LayerTensors({"qweight": pack_fields(q.t().contiguous(), 4, AWQ_PACK_ORDER),
                         "qzeros": pack_fields(z.t().contiguous(), 4, AWQ_PACK_ORDER),
                         "scales": s.t().contiguous()}, int4_dequantized(q, s, z))


def gptq_layer(w: torch.Tensor, group: int | None, sym: bool, v1: bool) -> LayerTensors:
    """GPTQ: qweight [K/8, N] packed along K, qzeros [K/G, N/8] (v1: zero - 1), scales
    fp16 [K/G, N], g_idx [K]. A v1 zero point is at least 1 (AutoGPTQ cannot store 0)."""
    q, s, z = int4_groups(w, group, sym, torch.float16, min_zero=1 if v1 else 0)
    k = w.shape[1]
    stored = z - 1 if v1 else z
    g = k if group is None else group
    # packed along K: word r of column n holds rows 8r + i in field i
    return LayerTensors({"qweight": pack_fields(q, 4).t().contiguous(),
                         "qzeros": pack_fields(stored.t().contiguous(), 4),
                         "scales": s.t().contiguous(),
                         "g_idx": (torch.arange(k) // g).to(torch.int32)},
                        int4_dequantized(q, s, z))


def fp8_block_layer(w: torch.Tensor, block: int = 128) -> LayerTensors:
    """quant_method fp8: weight e4m3 [N, K], weight_scale_inv fp32 [ceil(N/b), ceil(K/b)]."""
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float64)
    padded[:n, :k] = w.double()
    blocks = padded.reshape(rows, block, cols, block)
    scale = (blocks.abs().amax((1, 3)) / FP8_MAX).clamp_min(1e-8).float()
    full = scale.double().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    weight = (w.double() / full).to(torch.float8_e4m3fn)
    return LayerTensors({"weight": weight, "weight_scale_inv": scale},
                        weight.double() * full)


def fp8_tensor_layer(w: torch.Tensor, input_scale: float | None) -> LayerTensors:
    """vLLM-style quant_method fp8 per tensor: weight e4m3, weight_scale fp32 [] (scalar),
    input_scale [] when static."""
    scale = (w.double().abs().max() / FP8_MAX).float()
    weight = (w.double() / scale.double()).to(torch.float8_e4m3fn)
    tensors = {"weight": weight, "weight_scale": scale.reshape(())}
    if input_scale is not None:
        tensors["input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    return LayerTensors(tensors, weight.double() * scale.double())


# -- compressed-tensors, through the package ---------------------------------------------------

def ct_scheme(kind: str, group: int | None = None, sym: bool = True) -> tuple[Any, str]:
    """(compressed_tensors QuantizationScheme, format) of ``kind``: fp8-tensor-static,
    fp8-channel-dynamic, fp8-block, w4a16, w8a16."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def fp8(strategy: str, **kw: Any) -> Any:
        return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True,
                                **kw)

    if kind == "fp8-tensor-static":
        return QuantizationScheme(targets=["Linear"], weights=fp8("tensor"),
                                  input_activations=fp8("tensor", dynamic=False)), \
            "float-quantized"
    if kind == "fp8-channel-dynamic":
        return QuantizationScheme(targets=["Linear"], weights=fp8("channel"),
                                  input_activations=fp8("token", dynamic=True)), \
            "float-quantized"
    if kind == "fp8-block":
        return QuantizationScheme(
            targets=["Linear"], weights=fp8("block", block_structure=[128, 128]),
            input_activations=fp8("group", dynamic=True, group_size=128)), "float-quantized"
    bits = {"w4a16": 4, "w8a16": 8}[kind]
    strategy = "channel" if group is None else "group"
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group,
                            symmetric=sym)
    return QuantizationScheme(targets=["Linear"], weights=args), "pack-quantized"


def ct_quantization_config(scheme: Any, fmt: str, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` dict compressed-tensors writes for one scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                                quantization_status="compressed", ignore=ignore)
    return config.model_dump(mode="json")


def _ct_params(w: torch.Tensor, scheme: Any) -> dict[str, torch.Tensor]:
    """Min-max weight_scale (and zero point) in compressed-tensors' shapes."""
    args = scheme.weights
    n, k = w.shape
    if args.type == "float":
        if args.strategy == "tensor":
            return {"weight_scale": (w.abs().max() / FP8_MAX).reshape(1).float()}
        if args.strategy == "channel":
            return {"weight_scale": (w.abs().amax(1, keepdim=True) / FP8_MAX).float()}
        return {"weight_scale": fp8_block_layer(w).tensors["weight_scale_inv"]}
    qmax = 2 ** (args.num_bits - 1) - 1
    g = k if args.group_size is None else args.group_size
    wg = w.double().reshape(n, k // g, g)
    if args.symmetric:
        return {"weight_scale": (wg.abs().amax(-1) / qmax).clamp_min(1e-6).float()}
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2 * qmax + 1)).clamp_min(1e-6).float()
    zp = (torch.round(-lo / scale.double()) - qmax - 1).clamp(-qmax - 1, qmax)
    return {"weight_scale": scale, "weight_zero_point": zp.to(torch.int8)}


def ct_layer(w: torch.Tensor, scheme: Any, fmt: str,
             input_scale: float | None = None) -> LayerTensors:
    """compressed-tensors: the package's own compressor for ``fmt`` writes the tensors; its
    own decompressor gives the float weight (float64 from the stored integers/fp8 values)."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {"weight": w.float(), **_ct_params(w.float(), scheme)}
    tensors = compressor.compress(state, scheme)
    if input_scale is not None:
        tensors["input_scale"] = torch.tensor([input_scale], dtype=torch.float32)
    restored = compressor.decompress({k: v.clone() for k, v in tensors.items()}, scheme)
    return LayerTensors(dict(tensors), restored["weight"].double())


# -- whole checkpoints -------------------------------------------------------------------------

FORMAT_CASES: dict[str, Callable[[torch.Tensor], LayerTensors]] = {
    "awq-g32": lambda w: awq_layer(w, 32),
    "gptq-v1-sym-g32": lambda w: gptq_layer(w, 32, sym=True, v1=True),
    "gptq-v1-asym-g64": lambda w: gptq_layer(w, 64, sym=False, v1=True),
    "gptq-v2-asym-perchannel": lambda w: gptq_layer(w, None, sym=False, v1=False),
    "fp8-block": fp8_block_layer,
    "fp8-tensor-static": lambda w: fp8_tensor_layer(w, 0.05),
}
"""Name -> layer writer of the non-compressed-tensors cases of ``write_quantized``."""

QUANT_CONFIGS: dict[str, dict[str, Any]] = {
    "awq-g32": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                "zero_point": True, "modules_to_not_convert": None},
    "gptq-v1-sym-g32": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                        "desc_act": False, "damp_percent": 0.01, "true_sequential": True},
    "gptq-v1-asym-g64": {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False,
                         "desc_act": False, "checkpoint_format": "gptq"},
    "gptq-v2-asym-perchannel": {"quant_method": "gptq", "bits": 4, "group_size": -1,
                                "sym": False, "desc_act": False,
                                "checkpoint_format": "gptq_v2"},
    "fp8-block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128]},
    "fp8-tensor-static": {"quant_method": "fp8", "activation_scheme": "static"},
}
CT_CASES: dict[str, tuple[str, int | None, bool]] = {
    "ct-w4a16-g32-sym": ("w4a16", 32, True),
    "ct-w4a16-g32-asym": ("w4a16", 32, False),
    "ct-w8a16-channel": ("w8a16", None, True),
    "ct-fp8-channel-dynamic": ("fp8-channel-dynamic", None, True),
    "ct-fp8-tensor-static": ("fp8-tensor-static", None, True),
    "ct-fp8-block": ("fp8-block", None, True),
}
ALL_CASES = (*FORMAT_CASES, *CT_CASES)


def _layer_writer(case: str) -> tuple[Callable[[torch.Tensor], LayerTensors], dict[str, Any]]:
    if case in FORMAT_CASES:
        return FORMAT_CASES[case], QUANT_CONFIGS[case]
    kind, group, sym = CT_CASES[case]
    scheme, fmt = ct_scheme(kind, group, sym)
    static = kind == "fp8-tensor-static"
    return (lambda w: ct_layer(w, scheme, fmt, 0.05 if static else None),
            ct_quantization_config(scheme, fmt, ["lm_head"]))


def make_block_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny Llama whose every projection (and each q/k/v, gate/up shard) has a
    multiple of 128 rows and columns, the alignment 128x128 fp8 weight blocks need
    (tests/tiny_models.py's dims are smaller)."""
    import transformers

    from fuselm.bench.dummy_model import write_byte_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # weights that spread the logits out (as tests/tiny_models.py)
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 1.0 if "lm_head" in name else 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    return path


def int8_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded onto its symmetric per-row int8 grid (scale max|row| / 127): a weight
    that int8 per-channel quantization reproduces exactly."""
    scales = w.double().abs().amax(1, keepdim=True) / 127.0
    return (torch.round(w.double() / scales) * scales).to(w.dtype)


def write_quantized(case: str, float_dir: Path, out_dir: Path, dequant_dir: Path,
                    lm_head_on_int8_grid: bool = False) -> dict[str, LayerTensors]:
    """Quantizes every decoder linear of the float checkpoint ``float_dir`` as ``case``
    (ALL_CASES) into ``out_dir`` (config.json with its quantization_config), and writes the
    float checkpoint of the weights it encodes into ``dequant_dir``; returns the layers.
    ``lm_head_on_int8_grid``: both get an LM head already on its int8 grid (``int8_grid``),
    so an engine that runs the head in int8 computes the float twin's head exactly."""
    writer, quant_config = _layer_writer(case)
    weights = load_file(str(float_dir / "model.safetensors"))
    if lm_head_on_int8_grid:
        weights["lm_head.weight"] = int8_grid(weights["lm_head.weight"])
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerTensors] = {}
    for name, tensor in weights.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
            layer = writer(tensor)
            layers[module] = layer
            quantized.update({f"{module}.{s}": t.contiguous() for s, t in
                              layer.tensors.items()})
            dequantized[name] = layer.dequantized.to(tensor.dtype)
        else:
            quantized[name] = dequantized[name] = tensor
    config = json.loads((float_dir / "config.json").read_text())
    for folder, tensors, quant in ((out_dir, quantized, quant_config),
                                   (dequant_dir, dequantized, None)):
        shutil.copytree(float_dir, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(config, quantization_config=quant) if quant else config
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return layers
