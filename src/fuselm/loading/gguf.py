"""GGUF checkpoints: a Hugging Face style config, HF-named tensors, ggml dequantization, tokenizer.

A GGUF file holds metadata (llama.cpp key names) and tensors in ggml's block formats. This module
turns it into what the rest of fuselm expects from a Hugging Face checkpoint:

    ckpt = load_gguf(path)
    ckpt.config                          # dict with LlamaConfig / Qwen2Config keys
    for name, weight in ckpt.tensors():  # ("model.layers.0.self_attn.q_proj.weight", fp32 tensor)
        ...

The header is parsed once (`gguf_file.GGUFFile`); tensors are read lazily, one at a time.
llama.cpp's converter permutes the rows of Q and K of llama-arch models (to pair rotary halves the
GGML way); `tensors()` undoes it, on the raw quantized rows too (blocks never cross rows), so
weights come out laid out exactly as in the Hugging Face checkpoint. A tied LM head (no
`output.weight`) is not yielded: the config says `tie_word_embeddings=True`.

Dequantization (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) is vectorized torch code that
runs on whatever device the raw bytes are on; it follows ggml's block layouts
(`ggml-common.h`, `dequantize_row_*` in `ggml-quants.c`) and computes in float32.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from fuselm.errors import UnsupportedModelError, UnsupportedQuantizationError
from fuselm.loading.gguf_file import GGUFFile

logger = logging.getLogger(__name__)

QK_K = 256  # elements per K-quant super-block
Device = torch.device | str | None

# -- Dequantization: uint8 [num_blocks, type_size] -> float32 [num_blocks, block_size] --------


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [num_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


# In place into one float32 output: each temporary is fresh memory the kernel faults in
# (default model, Q4_1 tensors: 0.35 -> 0.14 s single-threaded on a 2-core EPYC).


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, qs: int8[32];  x = d * q
    out = blocks[:, 2:].contiguous().view(torch.int8).float()
    return out.mul_(_f16(blocks, 0))


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> float32 [n, 32]: the 16 low nibbles, then the 16 high nibbles."""
    out = torch.empty(qs.shape[0], 32, dtype=torch.float32, device=qs.device)
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    return out


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, qs: u8[16];  x = d * (q - 8)
    return _nibbles(blocks[:, 2:]).sub_(8.0).mul_(_f16(blocks, 0))


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, m: f16, qs: u8[16];  x = d * q + m
    return _nibbles(blocks[:, 4:]).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K scale bytes [n, 12] -> 6-bit scales and mins, float32 [n, 8] each: sub-blocks 0-3
    keep their scale/min in the low 6 bits of bytes 0-3 / 4-7; sub-blocks 4-7 take
    the low/high nibble of bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7.
    """
    sc_lo, m_lo, packed = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([sc_lo & 0x3F, (packed & 0x0F) | ((sc_lo >> 6) << 4)], dim=-1)
    mins = torch.cat([m_lo & 0x3F, (packed >> 4) | ((m_lo >> 6) << 4)], dim=-1)
    return sc.float(), mins.float()


def _k_low_bits(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: 32-byte chunk j holds sub-blocks 2j (low) and 2j+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16, dmin: f16, scales: u8[12], qs: u8[128];  x = d * sc * q - dmin * m
    sc, mins = _k_scale_min(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc).unsqueeze(-1)  # [n, 8, 1]
    offset = (_f16(blocks, 2) * mins).unsqueeze(-1)
    return (scale * _k_low_bits(blocks[:, 16:]).float() - offset).reshape(-1, QK_K)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin: f16, scales: u8[12], qh: u8[32] (bit k = 5th bit of sub-block k), qs: u8[128]
    sc, mins = _k_scale_min(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc).unsqueeze(-1)
    offset = (_f16(blocks, 2) * mins).unsqueeze(-1)
    qh = blocks[:, 16:48].reshape(-1, 1, 32)
    high = ((qh >> _BIT_SHIFTS.to(qh.device)) & 1) << 4  # [n, 8, 32]
    q = (_k_low_bits(blocks[:, 48:]) | high).float()
    return (scale * q - offset).reshape(-1, QK_K)


_Q6_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql: u8[128], qh: u8[64], scales: i8[16], d: f16;  x = d * scale * (q - 32)
    # Each half of 128 values: ql 64 bytes, qh 32 bytes; group g of 32 values takes nibble
    # (g >= 2 ? high : low) of ql[32 * (g % 2) + l] and bits 2g..2g+1 of qh[l].
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [n, 2 halves, 4 groups, 32]
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    high = ((qh >> _Q6_SHIFTS.to(qh.device)) & 0x03) << 4
    q = (low | high).float() - 32.0
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]: 16 values each
    scale = (_f16(blocks, 208) * scales).reshape(-1, 2, 4, 2, 1)
    return (scale * q.reshape(-1, 2, 4, 2, 16)).reshape(-1, QK_K)


_BLOCK_DEQUANT = {
    "Q8_0": _dequant_q8_0,
    "Q4_0": _dequant_q4_0,
    "Q4_1": _dequant_q4_1,
    "Q4_K": _dequant_q4_k,
    "Q5_K": _dequant_q5_k,
    "Q6_K": _dequant_q6_k,
}
_FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_GGML_TYPES: tuple[str, ...] = _FLOAT_TYPES + tuple(_BLOCK_DEQUANT)


def _check_supported(ggml_type: str) -> None:
    if ggml_type not in SUPPORTED_GGML_TYPES:
        raise UnsupportedQuantizationError(
            f"GGML tensor type {ggml_type} is not supported; supported types: "
            f"{', '.join(SUPPORTED_GGML_TYPES)}"
        )


def dequantize(data: torch.Tensor, ggml_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode raw ggml bytes into a float32 tensor of logical (torch order) `shape`.

    `data`: uint8, any shape, holding exactly the tensor's blocks in file order (each row of
    `shape[-1]` elements is a whole number of blocks). Runs on `data`'s device.
    """
    _check_supported(ggml_type)
    flat = data.reshape(-1)
    if ggml_type == "F32":
        out = flat.view(torch.float32)
    elif ggml_type == "F16":
        out = flat.view(torch.float16).float()
    elif ggml_type == "BF16":
        out = flat.view(torch.bfloat16).float()
    else:
        qtype = gguf.GGMLQuantizationType[ggml_type]
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        out = _BLOCK_DEQUANT[ggml_type](flat.reshape(-1, type_size))
    return out.reshape(shape)


@dataclass(frozen=True)
class QuantizedTensor:
    """One GGUF tensor kept in its ggml encoding, for quantized kernels.

    ggml_type: ggml type name, e.g. "Q4_1", "Q8_0", "F32".
    data: uint8 [*shape[:-1], row_bytes], the raw blocks of each row (Q/K rows already unpermuted).
    shape: the logical torch shape, e.g. [out_features, in_features].
    """

    ggml_type: str
    data: torch.Tensor
    shape: tuple[int, ...]

    @property
    def block_size(self) -> int:
        """Elements per ggml block (1 for float types)."""
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.ggml_type]][0]

    def dequantize(self) -> torch.Tensor:
        """The tensor as float32 of `shape`, on `data`'s device."""
        return dequantize(self.data, self.ggml_type, self.shape)


# -- Metadata -> Hugging Face config -----------------------------------------------------------

# general.architecture -> (HF architectures entry, model_type)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
# Architectures whose Q/K rows llama.cpp's converter permutes (GGML "normal" rope on HF weights).
_PERMUTED_QK = ("llama", "mistral")


def metadata_value(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """The decoded value of metadata `key` (str, int, float, bool or list), or `default`."""
    return reader.get(key, default)


def _rope_scaling(reader: GGUFFile, arch: str) -> dict[str, Any] | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*` (or the old `rope.scale_linear`)."""
    kind = metadata_value(reader, f"{arch}.rope.scaling.type")
    factor = metadata_value(reader, f"{arch}.rope.scaling.factor")
    if kind is None and metadata_value(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", metadata_value(reader, f"{arch}.rope.scale_linear")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = metadata_value(reader, f"{arch}.rope.scaling.original_context_length")
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": original,
        }
    raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported")


def _uniform(value: Any, key: str) -> int:
    """A per-layer metadata array that must hold one value (fuselm runs uniform layers)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"GGUF {key} varies per layer ({value}); not supported")
        value = value[0]
    return int(value)


def config_from_gguf(reader: GGUFFile) -> dict[str, Any]:
    """A Hugging Face style config dict (LlamaConfig / MistralConfig / Qwen2Config keys)."""
    arch = metadata_value(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}"
        )
    names = set(reader.tensors)
    if "rope_freqs.weight" in names:
        # Llama 3.1-style rope: llama.cpp stores precomputed frequency factors, not the HF
        # parameters (low/high_freq_factor) they came from.
        raise UnsupportedModelError("GGUF with rope_freqs.weight (llama3 rope) is not supported")

    def get(key: str, default: Any = None) -> Any:
        return metadata_value(reader, f"{arch}.{key}", default)

    hidden_size = int(get("embedding_length"))
    num_heads = _uniform(get("attention.head_count"), "attention.head_count")
    num_kv_heads = _uniform(get("attention.head_count_kv", num_heads), "attention.head_count_kv")
    head_dim = int(get("attention.key_length", hidden_size // num_heads))
    rotary_dim = get("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise UnsupportedModelError(f"partial rotary ({rotary_dim} of {head_dim}) not supported")
    vocab_size = get("vocab_size") or len(metadata_value(reader, "tokenizer.ggml.tokens", []))
    architecture, model_type = _ARCHITECTURES[arch]
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": _uniform(get("feed_forward_length"), "feed_forward_length"),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata_value(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in names,
    }


# -- Tensors -----------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


_TABLES = ("token_embd.weight", "output.weight")  # the vocabulary tables


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of GGUF tensor `gguf_name`, e.g. blk.3.attn_q.weight ->
    model.layers.3.self_attn.q_proj.weight. Unknown names raise UnsupportedModelError."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no fuselm equivalent")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _unpermute_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation along dim 0.

    llama.cpp writes, per head, rows [r0, r_half, r1, r_half+1, ...] (each rotary pair adjacent);
    HF keeps the halves apart. Row i of head h maps back via reshape(h, d/2, 2) -> (h, 2, d/2).
    """
    rows = t.shape[0]
    return (
        t.reshape(num_heads, rows // num_heads // 2, 2, *t.shape[1:])
        .transpose(1, 2)
        .reshape(t.shape)
    )


class GGUFCheckpoint:
    """A parsed GGUF file: `config` (HF style dict), `reader` (the header), lazy `tensors()`."""

    def __init__(self, path: Path, reader: GGUFFile) -> None:
        self.path = path
        self.reader = reader
        self.config: dict[str, Any] = config_from_gguf(reader)
        self.architecture: str = metadata_value(reader, "general.architecture")
        self._by_name = reader.tensors
        for name, info in self._by_name.items():
            hf_tensor_name(name)  # fail now, not halfway through loading
            _check_supported(info.ggml_type)

    @property
    def num_tensors(self) -> int:
        """Number of tensors `tensors()` yields."""
        return len(self._by_name)

    @property
    def quant_types(self) -> dict[str, int]:
        """Count of tensors per ggml type, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
        return dict(Counter(t.ggml_type for t in self._by_name.values()))

    def _qk_heads(self, gguf_name: str) -> int | None:
        """Heads to unpermute over for a llama-arch Q/K tensor, else None."""
        if self.architecture not in _PERMUTED_QK:
            return None
        if ".attn_q." in gguf_name:
            return self.config["num_attention_heads"]
        if ".attn_k." in gguf_name:
            return self.config["num_key_value_heads"]
        return None

    def raw_tensor(self, gguf_name: str, device: Device = None) -> QuantizedTensor:
        """Tensor `gguf_name` in its ggml encoding, Q/K rows unpermuted; reads only this tensor."""
        info = self._by_name[gguf_name]
        shape = info.shape
        data = self.reader.read_tensor(info).reshape(*shape[:-1], -1)
        heads = self._qk_heads(gguf_name)
        if heads is not None:
            data = _unpermute_rows(data, heads).contiguous()
        if device is not None:
            data = data.to(device)
        return QuantizedTensor(info.ggml_type, data, shape)

    def tensors(self, dequantize: bool = True, device: Device = None, packed_linear: bool = False,
                raw_tables: bool = False
                ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """Yield (hf_name, tensor) one at a time, in file order.

        dequantize=True: float32 tensors of HF shape, dequantized on `device` (default CPU).
        dequantize=False: `QuantizedTensor`s (every type, float ones included), data on `device`.
        packed_linear: the linear layers' weights (``*_proj``) stay `QuantizedTensor`s, named
        ``<module>.qweight`` (``layers/quantization/gguf_packed.py``), whatever `dequantize` says.
        raw_tables: the embedding and LM head tables stay `QuantizedTensor`s (their loader
        dequantizes them, or keeps Q8_0 blocks: ``layers/q8_table.py``).
        """
        for gguf_name in self._by_name:
            qt, name = self.raw_tensor(gguf_name, device), hf_tensor_name(gguf_name)
            if packed_linear and name.endswith("_proj.weight"):
                yield name.removesuffix("weight") + "qweight", qt
            elif raw_tables and gguf_name in _TABLES:
                yield name, qt
            else:
                yield name, qt.dequantize() if dequantize else qt


def load_gguf(source: str | Path | GGUFFile) -> GGUFCheckpoint:
    """Open GGUF `source` (a path, or a header parsed already): metadata now, tensor data only
    when iterated."""
    reader = source if isinstance(source, GGUFFile) else GGUFFile.open(source)
    return GGUFCheckpoint(reader.path, reader)


# -- Tokenizer ---------------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regexes, applied in order (as llama.cpp's llama-vocab.cpp does).
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    name: splits
    for names, splits in (
        ("default gpt2", (_GPT2_SPLIT,)),
        ("llama3 llama-bpe llama-v3 dbrx smaug-bpe falcon3 pixtral", (_LLAMA3_SPLIT,)),
        ("qwen2 deepseek-r1-qwen megrez", (_QWEN2_SPLIT,)),
        # StarCoder-style: every digit alone, then the GPT-2 split (SmolLM, StarCoder, ...).
        ("smollm starcoder refact command-r codeshell exaone minerva-7b", (r"\p{N}", _GPT2_SPLIT)),
    )
    for name in names.split()
}

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    splits = _PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        logger.warning("unknown GGUF pre-tokenizer %r; using the GPT-2 split", pre)
        splits = (_GPT2_SPLIT,)
    steps = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def tokenizer_from_gguf(source: str | Path | GGUFFile) -> HFTokenizer:
    """Build a `tokenizers.Tokenizer` from a GGUF's `tokenizer.ggml.*` metadata.

    Supports `tokenizer.ggml.model == "gpt2"` (byte-level BPE) with the pre-tokenizer split named by
    `tokenizer.ggml.pre`; control tokens become special added tokens, user-defined ones plain added
    tokens; BOS/EOS are prepended/appended per `tokenizer.ggml.add_bos_token`/`add_eos_token`.
    SentencePiece ("llama") vocabularies raise UnsupportedModelError.
    """
    reader = source if isinstance(source, GGUFFile) else GGUFFile.open(source)
    kind = metadata_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE); "
            "use the model's Hugging Face tokenizer directory instead"
        )
    tokens: list[str] = metadata_value(reader, "tokenizer.ggml.tokens")
    merges: list[str] = metadata_value(reader, "tokenizer.ggml.merges", [])
    token_types: list[int] = metadata_value(reader, "tokenizer.ggml.token_type") or []
    # Tokens are stored in the byte-level alphabet; a few files keep some in plain UTF-8.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {
        tok if set(tok) <= alphabet else byte_level.pre_tokenize_str(tok)[0][0]: i
        for i, tok in enumerate(tokens)
    }
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=False))
    tk.pre_tokenizer = _pre_tokenizer(metadata_value(reader, "tokenizer.ggml.pre", "default"))
    tk.decoder = decoders.ByteLevel()
    for ttype, special in ((_CONTROL, True), (_USER_DEFINED, False)):
        added = [
            AddedToken(tok, special=special, normalized=False)
            for tok, t in zip(tokens, token_types, strict=False)
            if t == ttype and tok in vocab
        ]
        if special:
            tk.add_special_tokens(added)
        else:
            tk.add_tokens(added)
    tk.post_processor = _bos_eos_processor(reader, tokens)
    return tk


def _bos_eos_processor(reader: GGUFFile, tokens: list[str]) -> processors.PostProcessor:
    """Template adding BOS/EOS around a sequence as the GGUF's add_bos/add_eos flags say."""
    single, special = "$A", []
    for flag, key, fmt in (("add_bos_token", "bos", "{} $A"), ("add_eos_token", "eos", "$A {}")):
        token_id = metadata_value(reader, f"tokenizer.ggml.{key}_token_id")
        if metadata_value(reader, f"tokenizer.ggml.{flag}", False) and token_id is not None:
            single = single.replace("$A", fmt.format(tokens[token_id]))
            special.append((tokens[token_id], token_id))
    return processors.TemplateProcessing(single=single, special_tokens=special)
