"""GGUF matmul with the weight kept in ggml's block formats: ``out = x @ W.T``.

qweight uint8 ``[N, (K // elems_per_block) * bytes_per_block]``: the file's raw blocks of each
row, in order (QUANT_SPEC "GGUF packed"); ``ggml_type`` the ``gguf.GGMLQuantizationType``
value. x ``[M, K]`` (fp16/bf16/fp32, last dim contiguous); out ``[M, N]`` in x's dtype,
accumulated in fp32. Block layouts (llama.cpp ``ggml-common.h``; d, m, dmin are fp16):

- Q8_0 (32 values, 34 bytes): d, int8 q[32];                  w = d q
- Q8_0_split (fuselm's, ``Q8_0_SPLIT``): a Q8_0 row's bytes rearranged by ``q8_0_split``, the
  layout the CUDA GEMV reads with 16-byte loads (the packed layer uses it on CUDA)
- Q4_0 (32, 18): d, q[16] (value j: low nibble of byte j, value 16 + j: its high nibble);
  w = d (q - 8)
- Q4_1 (32, 20): d, m, q[16] as Q4_0;                          w = d q + m
- Q4_K (256, 144): d, dmin, scales[12] (eight 6-bit scale/min pairs), q[128]; 32-byte chunk c
  holds sub-block 2c (low nibbles) and 2c + 1 (high); w = d sc_s q - dmin m_s
- Q5_K (256, 176): as Q4_K plus qh[32] before q: bit s of qh[l] is bit 4 of value l of
  sub-block s
- Q6_K (256, 210): ql[128], qh[64], int8 scales[16], d; each half of 128 values takes 64 ql
  bytes and 32 qh bytes: value 32 g + l of a half is nibble g // 2 of ql[32 (g % 2) + l] with
  bits 2g..2g+1 of qh[l] on top, minus 32, times d scales[8 half + 2 g + l // 16]

Triton kernels (``_gguf_triton.py``) read the packed blocks and dequantize in registers:
``gemv`` (small M: fp32 FMAs, one x row a program), ``gemv16`` (the same for Q8_0 and Q4_K with
the packed bytes read as half-words and each value masked in place into a float's mantissa:
about one integer op a value, where the byte-wise decode needs three), ``gemm`` (``tl.dot`` over
dequantized tiles) and ``dequant`` (the weight to x's dtype, then cuBLAS; for the large
batches where the tuning table measures it faster). ``cuda``: Q4_K and Q8_0_split at <= 16 rows, the
CUDA tensor-core GEMV of the extension (``quant_gemv.launch_gguf_gemv``: the blocks read once for
all rows, the block scales applied in fp32); where it does not run (no extension, a CPU, an
unaligned row) the call takes the Triton config of the same batch instead. The variant and
launch config come per call from M: the table ``configs/gguf_matmul.json`` (bucket
``{type}_n{N}_k{K}_m{1|4|16|64|256}``, written by ``python -m fuselm.bench.kernels_gguf``),
else ``default_config``.

Backends: ``gguf_dequantize_ref`` / ``gguf_matmul_ref`` (float32 spec), ``gguf_matmul_triton``
(the torch op ``fuselm::gguf_matmul``).
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch

from fuselm.kernels import triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
TYPE_IDS: dict[str, int] = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
# fuselm's own row layout of Q8_0 (no ggml id): the same bytes a row, its q values first (in the
# order the CUDA GEMV's lanes read them, 16-byte aligned), then its scales (``q8_0_split``)
Q8_0_SPLIT = 1008
GGML_TYPES[Q8_0_SPLIT] = ("Q8_0_split", 32, 34)
VARIANTS = ("gemv", "gemv16", "gemm", "dequant", "cuda")
M_BUCKETS = (1, 4, 16, 64, 256)


def block_layout(ggml_type: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a supported ggml type id (ValueError otherwise)."""
    if ggml_type not in GGML_TYPES:
        names = ", ".join(f"{n} ({t})" for t, (n, _, _) in GGML_TYPES.items())
        raise ValueError(f"gguf_matmul ggml_type {ggml_type} is not supported; supported: "
                         f"{names}")
    _, elems, size = GGML_TYPES[ggml_type]
    return elems, size


def _check(qweight: torch.Tensor, ggml_type: int, k: int) -> None:
    elems, size = block_layout(ggml_type)
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(f"gguf qweight must be uint8 [N, row_bytes], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    if k % elems or qweight.shape[1] != k // elems * size:
        raise ValueError(f"gguf qweight rows of {GGML_TYPES[ggml_type][0]} with K={k} must "
                         f"hold {k // elems} whole blocks of {size} bytes (K a multiple of "
                         f"{elems}), got {qweight.shape[1]} bytes")


# -- Reference: each block format decoded in float32 ------------------------------------------


def _half(blocks: torch.Tensor, byte: int) -> torch.Tensor:
    """The fp16 at ``byte`` of each block as float32 ``[R, 1]``."""
    return blocks[:, byte:byte + 2].contiguous().view(torch.float16).float()


def _ref_q8_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _ref_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: the low nibbles are values 0..15, the high ones 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).float()


def _ref_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_ref_nibbles(b[:, 2:18]) - 8.0)


def _ref_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _ref_nibbles(b[:, 4:20]) + _half(b, 2)


def _k_scale_min(scales: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """6-bit (scale, min) of sub-block ``s`` from the 12 scale bytes ``[R, 12]``, float32
    ``[R, 1]`` each: sub-blocks 0..3 in the low 6 bits of bytes s / s + 4; 4..7 from a nibble
    of byte s + 4 with the top 2 bits of byte s - 4 / s."""
    q = scales.long()
    if s < 4:
        sc, mn = q[:, s] & 63, q[:, s + 4] & 63
    else:
        sc = (q[:, s + 4] & 0x0F) | ((q[:, s - 4] >> 6) << 4)
        mn = (q[:, s + 4] >> 4) | ((q[:, s] >> 6) << 4)
    return sc.float()[:, None], mn.float()[:, None]


def _ref_k(b: torch.Tensor, with_high_bit: bool) -> torch.Tensor:
    """Q4_K (``with_high_bit`` False) or Q5_K blocks -> ``[R, 256]``."""
    d, dmin = _half(b, 0), _half(b, 2)
    qh = b[:, 16:48].long() if with_high_bit else None
    qs = b[:, 48:176] if with_high_bit else b[:, 16:144]
    out = []
    for s in range(8):
        chunk = qs[:, 32 * (s // 2):32 * (s // 2) + 32].long()
        q = chunk & 0x0F if s % 2 == 0 else chunk >> 4
        if qh is not None:
            q = q | (((qh >> s) & 1) << 4)
        sc, mn = _k_scale_min(b[:, 4:16], s)
        out.append(d * sc * q.float() - dmin * mn)
    return torch.cat(out, dim=1)


def _ref_q6_k(b: torch.Tensor) -> torch.Tensor:
    d = _half(b, 208)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    out = []
    for half in range(2):
        ql, qh = b[:, 64 * half:64 * half + 64].long(), b[:, 128 + 32 * half:160 + 32 * half]
        for g in range(4):
            low = ql[:, 32 * (g % 2):32 * (g % 2) + 32]
            low = low & 0x0F if g < 2 else low >> 4
            q = (low | (((qh.long() >> (2 * g)) & 3) << 4)).float() - 32.0
            sc = scales[:, 8 * half + 2 * g:8 * half + 2 * g + 2].repeat_interleave(16, dim=1)
            out.append(d * sc * q)
    return torch.cat(out, dim=1)


def _split_order(k: int) -> torch.Tensor:
    """Logical column of each byte of a split row's q part: in each 64-value step, byte
    ``16 t + 8 b + v`` holds value ``32 b + 8 t + v`` (b: the step's block, t < 4, v < 8)."""
    t, b, v = torch.meshgrid(torch.arange(4), torch.arange(2), torch.arange(8), indexing="ij")
    step = (32 * b + 8 * t + v).reshape(64)
    return (torch.arange(0, k, 64)[:, None] + step[None, :]).reshape(k)


def q8_0_split(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Q8_0 rows ``[N, K / 32 * 34]`` in the split layout (``Q8_0_SPLIT``): each row the K int8
    values (``_split_order``), then the K / 32 fp16 scales; the same bytes. K % 64 == 0."""
    _check(qweight, TYPE_IDS["Q8_0"], k)
    if k % 64:
        raise ValueError(f"the Q8_0 split layout needs K % 64 == 0, got K={k}")
    n = qweight.shape[0]
    blocks = qweight.reshape(n, k // 32, 34)
    values = blocks[:, :, 2:].reshape(n, k)
    order = _split_order(k).to(qweight.device)
    return torch.cat([values[:, order], blocks[:, :, :2].reshape(n, k // 16)], dim=1)


def q8_0_unsplit(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """The Q8_0 blocks ``[N, K / 32 * 34]`` of split rows (``q8_0_split``'s inverse)."""
    _check(qweight, Q8_0_SPLIT, k)
    n = qweight.shape[0]
    values = torch.empty(n, k, dtype=torch.uint8, device=qweight.device)
    values[:, _split_order(k).to(qweight.device)] = qweight[:, :k]
    scales = qweight[:, k:].reshape(n, k // 32, 2)
    return torch.cat([scales, values.reshape(n, k // 32, 32)], dim=2).reshape(n, -1)


_REF = {8: _ref_q8_0, 2: _ref_q4_0, 3: _ref_q4_1, 12: lambda b: _ref_k(b, False),
        13: lambda b: _ref_k(b, True), 14: _ref_q6_k}


def gguf_dequantize_ref(qweight: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    """The logical weight float32 ``[N, k]`` of packed rows ``qweight`` uint8 ``[N, row_bytes]``
    of ggml type id ``ggml_type`` (module docstring)."""
    _check(qweight, ggml_type, k)
    if ggml_type == Q8_0_SPLIT:
        qweight, ggml_type = q8_0_unsplit(qweight, k), TYPE_IDS["Q8_0"]
    _, size = block_layout(ggml_type)
    blocks = qweight.reshape(-1, size)
    return _REF[ggml_type](blocks).reshape(qweight.shape[0], k)


def gguf_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` in float32 with W = ``gguf_dequantize_ref``; ``[M, N]`` in x's
    dtype."""
    if x.dim() != 2:
        raise ValueError(f"gguf_matmul needs x [M, K], got {tuple(x.shape)}")
    w = gguf_dequantize_ref(qweight, ggml_type, x.shape[1])
    return (x.float() @ w.t()).to(x.dtype)


# -- Launch configs ----------------------------------------------------------------------------


class GGUFConfig(NamedTuple):
    """A variant and its Triton launch parameters."""

    variant: str  # gemv | gemv16 (Q8_0/Q4_K read as half-words; others: gemv) | gemm | dequant
    # | cuda (Q4_K / Q8_0_split, M <= 16: block_n 16, num_warps split K)
    block_m: int = 1  # gemm: x rows a program (>= 16)
    block_n: int = 4  # weight rows a program
    block_b: int = 4  # ggml blocks of a row a loop iteration
    num_warps: int = 4
    num_stages: int = 1

    @property
    def label(self) -> str:
        """Stable name used by the sweep and the tuning table."""
        return (f"{self.variant}_m{self.block_m}_n{self.block_n}_b{self.block_b}"
                f"_w{self.num_warps}_s{self.num_stages}")

    @classmethod
    def from_dict(cls, d: dict) -> GGUFConfig:
        """Reads the ``triton`` entry of the tuning table."""
        return cls(str(d["variant"]), int(d.get("block_m", 1)), int(d["block_n"]),
                   int(d["block_b"]), int(d["num_warps"]), int(d.get("num_stages", 1)))

    def to_dict(self) -> dict:
        """The ``triton`` entry of the tuning table."""
        return self._asdict()


def m_bucket(m: int) -> int:
    """The tuning-table batch bucket of ``m`` rows: the smallest of M_BUCKETS >= m (else the
    largest)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def shape_bucket(ggml_type: int, n: int, k: int, m: int) -> str:
    """Tuning-table key, e.g. ``Q4_K_n4096_k4096_m1``."""
    return f"{GGML_TYPES[ggml_type][0]}_n{n}_k{k}_m{m_bucket(m)}"


def default_config(ggml_type: int, n: int, k: int, m: int) -> GGUFConfig:
    """Untuned choice: the cuda GEMV for Q4_K / Q8_0_split at M <= 16 (16 warps along K where
    N <= 4096, else 8; at most 8 above 8 rows), else ``triton_default_config``."""
    from fuselm.kernels import quant_gemv

    cols = quant_gemv.GGUF_STEP_COLS.get(ggml_type)
    if m <= quant_gemv.GGUF_MAX_M and cols and k % cols == 0:
        _, warps, _ = quant_gemv.default_launch(n, k // cols, m)
        if m > quant_gemv.STRIDED_MAX_M:
            warps = min(warps, quant_gemv.GGUF_TWO_TILE_WARPS)
        return GGUFConfig("cuda", 1, 16, 1, warps, 1)
    return triton_default_config(ggml_type, n, k, m)


def triton_default_config(ggml_type: int, n: int, k: int, m: int) -> GGUFConfig:
    """Untuned Triton choice: gemv (tiles of about 2048 weight values) for M <= 4, dequantize +
    cuBLAS above (on the H200's 8B shapes it beat the fused gemm 3-10x at M 16-64, 2026-12-04)."""
    elems, _ = block_layout(ggml_type)
    if m <= 4:
        return GGUFConfig("gemv", 1, 4, 8 if elems == 32 else 2, 4, 1)
    return GGUFConfig("dequant", 1, 32, 8 if elems == 32 else 1, 4, 1)


@cache
def tuned_config(ggml_type: int, n: int, k: int, m: int, device_index: int) -> GGUFConfig:
    """The config the tuning table recorded for this type, shape and batch bucket on the CUDA
    device ``device_index``, else ``default_config`` (cached: one lookup per shape)."""
    entry = triton_utils.tuned_triton_config("gguf_matmul", shape_bucket(ggml_type, n, k, m),
                                             "cuda", device_index)
    return GGUFConfig.from_dict(entry) if entry else default_config(ggml_type, n, k, m_bucket(m))


# -- Triton backend ----------------------------------------------------------------------------


def _config_for(x: torch.Tensor, ggml_type: int, n: int, k: int) -> GGUFConfig:
    m = x.shape[0]
    if x.device.type != "cuda":
        return default_config(ggml_type, n, k, m)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return tuned_config(ggml_type, n, k, m_bucket(m), index)


def gguf_dequantize_triton(qweight: torch.Tensor, ggml_type: int, k: int,
                           dtype: torch.dtype = torch.bfloat16,
                           cfg: GGUFConfig | None = None) -> torch.Tensor:
    """The logical weight ``[N, k]`` in ``dtype``, dequantized by a Triton kernel."""
    from fuselm.kernels import _gguf_triton

    _check(qweight, ggml_type, k)
    out = torch.empty(qweight.shape[0], k, dtype=dtype, device=qweight.device)
    cfg = cfg or default_config(ggml_type, qweight.shape[0], k, 256)
    _gguf_triton.launch_dequant(qweight, ggml_type, out, cfg)
    return out


def launch_gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, ggml_type: int,
                       out: torch.Tensor, cfg: GGUFConfig) -> None:
    """Runs ``cfg``'s variant into ``out [M, N]`` (the benchmark's and the tests' entry)."""
    from fuselm.kernels import _gguf_triton

    m, k = x.shape
    if m == 0 or qweight.shape[0] == 0:
        return
    if cfg.variant == "cuda":
        from fuselm.kernels import _pdl, quant_gemv

        if quant_gemv.launch_gguf_gemv(x, qweight, ggml_type, out, cfg.num_warps,
                                       _pdl.use_pdl(x)):
            return
        cfg = triton_default_config(ggml_type, qweight.shape[0], k, m)
    if cfg.variant == "dequant":
        w = gguf_dequantize_triton(qweight, ggml_type, k, x.dtype, cfg)
        torch.matmul(x, w.t(), out=out)
    elif cfg.variant in ("gemv", "gemv16", "gemm"):
        _gguf_triton.launch_matmul(x, qweight, ggml_type, out, cfg)
    else:
        raise ValueError(f"unknown gguf_matmul variant {cfg.variant!r}; expected {VARIANTS}")


def gguf_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Triton ``x @ W.T`` on the packed blocks; same contract as ``gguf_matmul_ref``."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"gguf_matmul needs x [M, K] contiguous in its last dim, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    _check(qweight, ggml_type, x.shape[1])
    n, k = qweight.shape[0], x.shape[1]
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    launch_gguf_matmul(x, qweight, ggml_type, out, _config_for(x, ggml_type, n, k))
    return out


FUSELM_LIB.define("gguf_matmul(Tensor x, Tensor qweight, int ggml_type) -> Tensor")


@torch.library.register_fake("fuselm::gguf_matmul", lib=FUSELM_LIB)
def _gguf_matmul_fake(x: torch.Tensor, qweight: torch.Tensor, ggml_type: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("gguf_matmul", gguf_matmul_triton, _key)
