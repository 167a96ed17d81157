"""Random GGUF weights of a known model shape, kept in one ggml block type, for benchmarks.

``random_blocks`` makes packed rows (``kernels.gguf_matmul`` layout) of random bytes whose fp16
scale fields hold sane values (weights of about 0.01-0.05, as a trained layer's), on any device.
``write_dummy_gguf`` writes a whole llama-arch file (metadata, a filler byte-level tokenizer,
F32 norms, every matrix in one type) that ``fuselm bench latency --model FILE`` loads:

    python -m fuselm.bench.dummy_gguf --shape llama-3-8b --type Q4_K --out /tmp/l3-q4k.gguf

The bytes are drawn on the GPU when there is one (the 8B file, 4.6 GB at Q4_K, in about 20 s
most of it the disk write); on a CPU use it for small shapes (``--layers``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fuselm.kernels.gguf_matmul import GGML_TYPES, TYPE_IDS, block_layout

# ggml type id -> [(byte offset of an fp16 field, low, high)]: the field's values are drawn
# uniformly in [low, high) (Q4_1's min negative: centred weights)
_SCALE_FIELDS: dict[int, list[tuple[int, float, float]]] = {
    8: [(0, 1.5e-4, 3e-4)],
    2: [(0, 3e-3, 6e-3)],
    3: [(0, 3e-3, 6e-3), (2, -4.5e-2, -2.5e-2)],
    12: [(0, 1e-4, 2e-4), (2, 4e-4, 8e-4)],
    13: [(0, 5e-5, 1e-4), (2, 4e-4, 8e-4)],
    14: [(208, 2e-5, 4e-5)],
}


def random_blocks(ggml_type: int, n: int, k: int, device: torch.device | str = "cpu",
                  seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, k // elems * bytes]``: random packed rows of ggml type id ``ggml_type`` with
    sane fp16 scales (``_SCALE_FIELDS``), on ``device``."""
    elems, size = block_layout(ggml_type)
    if k % elems:
        raise ValueError(f"k={k} is not a multiple of the {elems}-value blocks of "
                         f"{GGML_TYPES[ggml_type][0]}")
    gen = torch.Generator(device=device).manual_seed(seed)
    num_blocks = n * k // elems
    blocks = torch.randint(0, 256, (num_blocks, size), dtype=torch.uint8, device=device,
                           generator=gen)
    for offset, low, high in _SCALE_FIELDS[ggml_type]:
        values = torch.rand(num_blocks, device=device, generator=gen) * (high - low) + low
        blocks[:, offset:offset + 2] = values.half().view(torch.uint8).view(num_blocks, 2)
    return blocks.view(n, -1)


def _filler_vocab(vocab_size: int) -> list[str]:
    """The 256 byte-level tokens, then distinct filler words (ids 256 .. vocab_size - 1)."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())
    tokens += [f"Ġw{i}" for i in range(vocab_size - len(tokens))]
    return tokens[:vocab_size]


def _write_metadata(writer, cfg: dict, vocab_size: int) -> None:
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_vocab_size(vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_filler_vocab(vocab_size))
    writer.add_token_types([1] * vocab_size)
    writer.add_bos_token_id(vocab_size - 2)
    writer.add_eos_token_id(vocab_size - 1)


def _tensors(cfg: dict) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """(GGUF name, torch shape) of a llama-arch model, in file order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    out: list = [("token_embd.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        out += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (h, h)),
                (f"blk.{i}.attn_k.weight", (kv, h)), (f"blk.{i}.attn_v.weight", (kv, h)),
                (f"blk.{i}.attn_output.weight", (h, h)), (f"blk.{i}.ffn_norm.weight", (h,)),
                (f"blk.{i}.ffn_gate.weight", (f, h)), (f"blk.{i}.ffn_up.weight", (f, h)),
                (f"blk.{i}.ffn_down.weight", (h, f))]
    return out + [("output_norm.weight", (h,)), ("output.weight", (v, h))]


def write_dummy_gguf(path: str | Path, shape: str = "llama-3-8b", ggml_type: str = "Q4_K",
                     num_layers: int | None = None, device: str | None = None) -> Path:
    """Writes a llama-arch GGUF of model ``shape`` (``bench.dummy_model.KNOWN_SHAPES``) whose
    every matrix is random ``ggml_type`` blocks; returns the path."""
    import gguf

    from fuselm.bench.dummy_model import KNOWN_SHAPES

    if shape not in KNOWN_SHAPES:
        raise ValueError(f"--shape {shape!r} unknown; known: {sorted(KNOWN_SHAPES)}")
    if ggml_type not in TYPE_IDS:
        raise ValueError(f"--type {ggml_type!r} unknown; supported: {sorted(TYPE_IDS)}")
    cfg = dict(KNOWN_SHAPES[shape])
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tid = TYPE_IDS[ggml_type]
    qtype = gguf.GGMLQuantizationType(tid)
    path = Path(path)
    writer = gguf.GGUFWriter(path, "llama")
    _write_metadata(writer, cfg, cfg["vocab_size"])
    tensors = _tensors(cfg)
    elems, size = block_layout(tid)
    for name, shp in tensors:
        if len(shp) == 1:
            writer.add_tensor_info(name, shp, np.dtype(np.float32), shp[0] * 4)
        else:
            nbytes = shp[0] * shp[1] // elems * size
            writer.add_tensor_info(name, (shp[0], shp[1] // elems * size), np.dtype(np.uint8),
                                   nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (_name, shp) in enumerate(tensors):
        if len(shp) == 1:
            writer.write_tensor_data(np.ones(shp, dtype=np.float32))
        else:
            data = random_blocks(tid, shp[0], shp[1], dev, seed=i)
            writer.write_tensor_data(data.cpu().numpy())
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3-8b", help="a bench.dummy_model shape")
    p.add_argument("--type", default="Q4_K", help=f"ggml block type: {', '.join(TYPE_IDS)}")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers")
    p.add_argument("--device", default=None, help="where the random bytes are drawn")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        path = write_dummy_gguf(args.out, args.shape, args.type, args.layers, args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {args.type}) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
