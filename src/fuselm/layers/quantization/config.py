"""What quantization a model runs: ``QuantizationConfig``, from ``--quantization`` or from a
checkpoint's ``quantization_config``.

No torch import here: ``fuselm.config`` reads it while parsing a model's config.json.
Tensor conversion of each checkpoint format lives in ``fuselm.loading.quant_formats``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from fuselm.errors import UnsupportedModelError

Method = Literal["fp8", "int8", "int4", "gguf"]
ActivationScheme = Literal["none", "dynamic", "static"]
Source = Literal["online", "compressed-tensors", "fp8", "awq", "gptq", "gguf"]
KNOWN_HF_METHODS = ("compressed-tensors", "fp8", "awq", "gptq")
"""``quant_method`` values of a Hugging Face ``quantization_config`` that fuselm loads."""
DEFAULT_GROUP_SIZE = 128
FP8_BLOCK = 128


@dataclass(frozen=True)
class QuantizationConfig:
    """One model's quantization scheme (validated on construction: ValueError naming the field).
    """

    method: Method
    """Linear method the layers run: ``fp8`` (W8A8 e4m3), ``int8`` (W8A16 per channel),
    ``int4`` (W4A16 groups), ``gguf`` (GGUF blocks kept packed)."""
    source: Source = "online"
    """Where the quantized weights come from: quantized at load (``online``) or the checkpoint
    format (converted to the canonical layouts by ``loading.quant_formats``)."""
    bits: int = 8
    """Weight bits (4 or 8)."""
    group_size: int | None = None
    """int4: input columns sharing one scale and zero point; None: one group per row (per
    channel)."""
    zero_point: bool = False
    """int4: asymmetric, integer zero points stored (symmetric formats store 8)."""
    activation_scheme: ActivationScheme = "none"
    """fp8: ``dynamic`` per-token activation scales, ``static`` per-tensor ``input_scale``,
    ``none`` weight-only (the weight is dequantized for the matmul)."""
    weight_block: tuple[int, int] | None = None
    """fp8: ``(rows, cols)`` of one weight-scale block (128, 128); None: per channel."""
    ignore: tuple[str, ...] = ()
    """Module names (checkpoint names, e.g. ``lm_head``, ``model.layers.0.mlp.down_proj``) kept
    in float."""
    lm_head_bits: int | None = None
    """8: the LM head is int8 per channel, quantized at load from the checkpoint's float head
    (int4/int8, online or pre-quantized weight-only); None: the LM head stays float."""
    rounding: Literal["nearest", "gptq"] = "nearest"
    """online fp8: how the weights were rounded (``gptq``: ``--quantization-calibration
    gptq``, see ``engine/calibration.py``)."""
    checkpoint_format: str = ""
    """The checkpoint's own layout name (compressed-tensors ``format``, AWQ ``version``)."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The checkpoint's ``quantization_config`` as read (for ``loading.quant_formats``)."""

    def __post_init__(self) -> None:
        if self.method not in ("fp8", "int8", "int4", "gguf"):
            raise ValueError(f"QuantizationConfig.method must be fp8, int8, int4 or gguf, "
                             f"got {self.method!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"QuantizationConfig.bits must be 4 or 8, got {self.bits!r}")
        if self.method == "int4" and self.bits != 4 or self.method in ("int8", "fp8") \
                and self.bits != 8:
            raise ValueError(f"QuantizationConfig: method {self.method} with bits {self.bits}")
        gs = self.group_size
        if gs is not None and (not isinstance(gs, int) or gs < 2 or gs % 2):
            raise ValueError(f"QuantizationConfig.group_size must be an even integer >= 2 or "
                             f"None, got {gs!r}")
        if self.activation_scheme not in ("none", "dynamic", "static"):
            raise ValueError("QuantizationConfig.activation_scheme must be none, dynamic or "
                             f"static, got {self.activation_scheme!r}")
        if self.weight_block is not None and self.weight_block != (FP8_BLOCK, FP8_BLOCK):
            raise UnsupportedModelError(
                f"fp8 weight_block_size {list(self.weight_block)} is not supported (fuselm "
                f"runs {FP8_BLOCK}x{FP8_BLOCK} blocks)")
        if self.rounding not in ("nearest", "gptq") or (self.rounding == "gptq" and (
                self.method != "fp8" or self.source != "online")):
            raise ValueError(f"QuantizationConfig.rounding {self.rounding!r}: nearest, or gptq "
                             "for online fp8")
        if self.lm_head_bits not in (None, 8):
            raise ValueError(f"QuantizationConfig.lm_head_bits must be 8 or None, got "
                             f"{self.lm_head_bits!r}")

    @classmethod
    def online(cls, name: str) -> QuantizationConfig:
        """The scheme of ``--quantization NAME`` (fp8, int8, int4) applied to a float
        checkpoint at load."""
        if name == "fp8":
            return cls("fp8", bits=8, activation_scheme="dynamic")
        if name == "int8":
            return cls("int8", bits=8, lm_head_bits=8)
        if name == "int4":
            return cls("int4", bits=4, group_size=DEFAULT_GROUP_SIZE, zero_point=True,
                       lm_head_bits=8)
        raise ValueError(f"--quantization must be one of fp8, int8, int4, got {name!r}")

    @classmethod
    def from_hf(cls, quant: Any) -> QuantizationConfig:
        """Parses a checkpoint's ``quantization_config``; raises UnsupportedModelError naming
        any ``quant_method`` (or scheme within one) fuselm does not run."""
        if not isinstance(quant, dict):
            raise UnsupportedModelError(f"quantization_config must be a mapping, got {quant!r}")
        method = str(quant.get("quant_method", "unknown")).lower().replace("_", "-")
        parse = {"compressed-tensors": _compressed_tensors, "fp8": _hf_fp8, "awq": _awq,
                 "gptq": _gptq}.get(method)
        if parse is None:
            raise UnsupportedModelError(
                f"the checkpoint's quantization_config.quant_method {method!r} is not "
                f"supported; fuselm loads {', '.join(KNOWN_HF_METHODS)} checkpoints, or "
                "quantizes a float checkpoint itself with --quantization {fp8,int8,int4}")
        return dataclasses.replace(parse(quant), raw=dict(quant))

    def skips(self, name: str) -> bool:
        """Whether the module ``name`` (a checkpoint name, with or without ``model.``) stays
        float."""
        short = name.removeprefix("model.")
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                import re

                if re.fullmatch(pattern[3:], name) or re.fullmatch(pattern[3:], short):
                    return True
            elif pattern.removeprefix("model.") == short or short.endswith("." + pattern):
                return True
        return False

    def describe(self) -> str:
        """One phrase for the startup report, e.g. ``int4 g128 zp (online)``."""
        parts = [self.method]
        if self.method == "int4":
            parts.append(f"g{self.group_size}" if self.group_size else "per-channel")
            parts.append("asym" if self.zero_point else "sym")
        if self.method == "fp8":
            parts.append("block128" if self.weight_block else "per-channel")
            parts.append({"dynamic": "w8a8 dynamic", "static": "w8a8 static",
                          "none": "w8a16"}[self.activation_scheme])
        if self.rounding == "gptq":
            parts.append("gptq")
        if self.lm_head_bits:
            parts.append(f"lm_head int{self.lm_head_bits}")
        return " ".join(parts) + f" ({self.source})"


def _ignore_list(quant: dict[str, Any], *keys: str) -> tuple[str, ...]:
    names: list[str] = []
    for key in keys:
        names += list(quant.get(key) or [])
    return tuple(names)


def _hf_fp8(quant: dict[str, Any]) -> QuantizationConfig:
    """transformers FineGrainedFP8 (``weight_block_size``) or vLLM-style fp8 (per tensor)."""
    block = quant.get("weight_block_size")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedModelError(f"fp8 quantization_config fmt {fmt!r} is not supported "
                                    "(fuselm runs e4m3)")
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise UnsupportedModelError(f"fp8 activation_scheme {scheme!r} is not supported")
    return QuantizationConfig(
        "fp8", source="fp8", bits=8, activation_scheme=scheme,
        weight_block=tuple(block) if block else None,
        ignore=_ignore_list(quant, "modules_to_not_convert", "ignored_layers"))


def _awq(quant: dict[str, Any]) -> QuantizationConfig:
    bits = int(quant.get("bits", quant.get("w_bit", 4)))
    version = str(quant.get("version", "gemm")).lower()
    if bits != 4:
        raise UnsupportedModelError(f"awq with {bits} bits is not supported (fuselm runs 4)")
    if version != "gemm":
        raise UnsupportedModelError(f"awq version {version!r} is not supported (fuselm reads "
                                    "the gemm packing)")
    group = int(quant.get("group_size", quant.get("q_group_size", DEFAULT_GROUP_SIZE)))
    return QuantizationConfig(
        "int4", source="awq", bits=4, group_size=None if group < 0 else group,
        zero_point=bool(quant.get("zero_point", True)), checkpoint_format=version, lm_head_bits=8,
        ignore=_ignore_list(quant, "modules_to_not_convert"))


def _gptq(quant: dict[str, Any]) -> QuantizationConfig:
    bits = int(quant.get("bits", 4))
    if bits != 4:
        raise UnsupportedModelError(f"gptq with {bits} bits is not supported (fuselm runs 4)")
    # desc_act: loading.quant_formats refuses a layer whose g_idx is not the trivial order
    group = int(quant.get("group_size", DEFAULT_GROUP_SIZE))
    return QuantizationConfig(
        "int4", source="gptq", bits=4, group_size=None if group < 0 else group,
        zero_point=not bool(quant.get("sym", True)),
        checkpoint_format=str(quant.get("checkpoint_format", "gptq")), lm_head_bits=8,
        ignore=_ignore_list(quant, "modules_to_not_convert"))


def _compressed_tensors(quant: dict[str, Any]) -> QuantizationConfig:
    """One weight scheme for every Linear (``config_groups``), fp8 or int4/int8."""
    groups = list((quant.get("config_groups") or {}).values())
    schemes = {repr((g.get("weights"), g.get("input_activations"))) for g in groups}
    if len(schemes) != 1:
        raise UnsupportedModelError(
            f"compressed-tensors with {len(schemes)} different schemes in config_groups is not "
            "supported (fuselm runs one scheme for every linear layer)")
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
    wtype, bits = weights.get("type", "int"), int(weights.get("num_bits", 8))
    strategy = weights.get("strategy", "channel")
    fmt = str(quant.get("format", ""))
    ignore = _ignore_list(quant, "ignore")
    if wtype == "float" and bits == 8:
        return _ct_fp8(weights, acts, strategy, fmt, ignore)
    if wtype == "int" and bits in (4, 8) and acts is None:
        if strategy not in ("channel", "group"):
            raise UnsupportedModelError(f"compressed-tensors int{bits} strategy {strategy!r} "
                                        "is not supported (channel or group)")
        group = int(weights["group_size"]) if strategy == "group" else None
        sym = bool(weights.get("symmetric", True))
        if bits == 8:
            if not sym or group is not None:
                raise UnsupportedModelError("compressed-tensors int8 weights must be symmetric "
                                            "per channel")
            return QuantizationConfig("int8", source="compressed-tensors", bits=8,
                                      checkpoint_format=fmt, ignore=ignore, lm_head_bits=8)
        return QuantizationConfig("int4", source="compressed-tensors", bits=4,
                                  group_size=group, zero_point=not sym,
                                  checkpoint_format=fmt, ignore=ignore, lm_head_bits=8)
    act = f" with {acts.get('type')}{acts.get('num_bits')} activations" if acts else ""
    raise UnsupportedModelError(
        f"compressed-tensors scheme weights {wtype}{bits}{act}"
        " is not supported (fuselm runs fp8 W8A8/W8A16, int8 and int4 weight-only)")


def _ct_fp8(weights: dict[str, Any], acts: dict[str, Any] | None, strategy: str, fmt: str,
            ignore: tuple[str, ...]) -> QuantizationConfig:
    if strategy not in ("tensor", "channel", "block"):
        raise UnsupportedModelError(f"compressed-tensors fp8 weight strategy {strategy!r} is "
                                    "not supported (tensor, channel or block)")
    block = tuple(weights.get("block_structure") or (FP8_BLOCK, FP8_BLOCK)) \
        if strategy == "block" else None
    scheme = "none"
    if acts is not None:
        if acts.get("type", "float") != "float" or int(acts.get("num_bits", 8)) != 8:
            raise UnsupportedModelError("compressed-tensors fp8 weights with non-fp8 "
                                        "activations are not supported")
        scheme = "dynamic" if acts.get("dynamic", True) else "static"
    return QuantizationConfig("fp8", source="compressed-tensors", bits=8,
                              activation_scheme=scheme, weight_block=block,
                              checkpoint_format=fmt, ignore=ignore)
