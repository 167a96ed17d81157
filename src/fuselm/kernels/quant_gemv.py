"""The CUDA weight-only GEMV at batch 1..16 (``csrc/quant_gemv.cu``): the ``cuda_gemv`` variant of
``int4_matmul`` (W4A16, group-wise zeros) and ``int8_matmul`` (W8A16, per-channel scales), and
``fp8_w8a16_gemv`` (e4m3 weights, per-channel scales, bf16/fp16 x): what the op
``fuselm::fp8_w8a16_gemv`` runs at decode batches (``FP8_MAX_M``), where the fp8 layers take
it instead of quantizing the activations; and ``gguf_gemv`` (``csrc/gguf_gemv.cu``): GGUF Q4_K
rows read as the file's blocks and Q8_0 rows in the split layout (``gguf_matmul.q8_0_split``),
the ``cuda`` variant of ``gguf_matmul`` at <= 16 rows.

Same math, layouts and dtypes as ``int4_matmul_ref`` / ``int8_matmul_ref`` (read as is, no
repacking), for fp16 / bf16 x of at most 16 rows; fp32 accumulation, out in x's dtype. Tensor
cores (mma m16n8k16) take 16 weight rows by 8 batch rows (two such tiles share the weights
beyond 8), so every weight byte is read once for all rows. Needs K % 128 == 0 and
group_size % 128 == 0 (int4) or K % 64 == 0 (int8), weight rows and x rows 16-byte aligned;
the launchers return False for inputs it does not take, and the op modules then run their
Triton config.

Launch parameters, in the op's ``QuantMatmulConfig``: ``block_n`` 16 (weight rows a block),
``num_warps`` warps that split K (1..16), ``num_stages`` the weight stream: 1 strided (warp w
takes K steps w, w + W, ..., two at a time; at most 8 rows), 2 or 4 the ring of that depth
(a warp takes one contiguous run of steps and keeps that many in flight; up to 16 rows), 3
the lean ring (depth 2, the address arithmetic out of the loop; at most 8 rows; 13: its two
MMA accumulators a step, the H200 pick for int4 gate_up); a K
step is int4 128 columns, int8 64 (see the .cu file). ``fuselm_C::int4_gemv`` /
``int8_gemv`` write a given ``out`` (nothing allocated, no sync: CUDA-graph safe); with PDL the
weights are requested before waiting for the previous kernel.
"""

from __future__ import annotations

import torch

from fuselm.kernels import _pdl, extension

MAX_M = 16  # the ring stream (stages 2, 4); the strided one (stages 1) takes at most 8
STRIDED_MAX_M = 8
FP8_MAX_M = 8  # the fp8 layers' W8A16 GEMV serves up to this many rows (decode batches)
INT4_STEP_COLS = 128  # K columns of one warp step (G % 128 == 0: one group)
INT8_STEP_COLS = 64
GGUF_MAX_M = 16  # above 8 rows (two MMA tiles) at most GGUF_TWO_TILE_WARPS warps
GGUF_TWO_TILE_WARPS = 8
# type id (gguf_matmul.Q8_0_SPLIT: Q8_0 rows split; Q4_K) -> K columns of a warp step
GGUF_STEP_COLS = {1008: 64, 12: 128}
_DTYPES = (torch.float16, torch.bfloat16)


def _ops(build: bool):
    ops = extension.load_extension() if build else extension.loaded_extension()
    return ops if ops is not None and hasattr(ops, "int4_gemv") else None


def available(build: bool = True) -> bool:
    """Whether the extension has the kernels (``build=False``: only if already loaded)."""
    return _ops(build) is not None


STAGES = (1, 2, 3, 4, 13)  # 1: the strided stream; 2, 4: the ring of that depth; 3: the lean ring
LEAN_STAGES = (3, 13)  # the lean ring (13: two accumulators): 32-bit scale offsets, <= 8 rows


def valid_launch(block_n: int, num_warps: int, num_stages: int) -> bool:
    """Whether the kernel has this launch (rows a block, K-splitting warps, weight stream)."""
    return block_n == 16 and num_stages in STAGES and 1 <= num_warps <= 16


def max_rows(num_stages: int) -> int:
    """The most x rows the weight stream ``num_stages`` takes."""
    return STRIDED_MAX_M if num_stages == 1 or num_stages in LEAN_STAGES else MAX_M


def default_launch(n: int, k_steps: int, m: int) -> tuple[int, int, int]:
    """Heuristic ``(block_n, num_warps, num_stages)``: 16 rows a block; 16 warps along K where
    there are few blocks (N <= 4096: 256 blocks, 2 an SM), else 8; the strided stream up to 8
    rows, the ring of depth 2 beyond (the H200 sweep's picks on most Llama-3-8B shapes); never
    more warps than K steps."""
    warps = 16 if n <= 4096 else 8
    while warps > 1 and warps > k_steps:
        warps //= 2
    return 16, warps, 1 if m <= STRIDED_MAX_M else 2


def _runnable(x: torch.Tensor, qweight: torch.Tensor, out: torch.Tensor, max_m: int) -> bool:
    """The inputs the kernels take, up to ``max_m`` rows (the binding raises on the others)."""
    return (x.is_cuda and x.dtype in _DTYPES and 0 < x.shape[0] <= max_m
            and x.stride(1) == 1
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and qweight.stride(1) == 1
            and qweight.stride(0) % 16 == 0 and qweight.data_ptr() % 16 == 0
            and out.stride(1) == 1 and out.dtype == x.dtype)


def launch_int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, group_size: int, out: torch.Tensor, block_n: int,
                     num_warps: int, num_stages: int, pdl: bool) -> bool:
    """``out [M, N] = x @ W.T`` of the canonical int4 layout; False (nothing launched) where
    the kernel does not take these inputs."""
    ops = _ops(build=True)
    if (ops is None or group_size % INT4_STEP_COLS or not valid_launch(block_n, num_warps,
                                                                        num_stages)
            or not _runnable(x, qweight, out, max_rows(num_stages))
            or (scales.shape[1] > 1 and (scales.stride(1) != 1 or zeros.stride(1) != 1))
            or (num_stages in LEAN_STAGES
                and qweight.shape[0] * max(scales.stride(0), zeros.stride(0)) >= 2**31)):
        return False
    ops.int4_gemv(out, x, qweight, scales, zeros, group_size, num_warps, num_stages, pdl)
    return True


def launch_int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     out: torch.Tensor, block_n: int, num_warps: int, num_stages: int,
                     pdl: bool) -> bool:
    """``out [M, N] = x @ (qweight * scales[:, None]).T``; False (nothing launched) where the
    kernel does not take these inputs."""
    ops = _ops(build=True)
    if (ops is None or x.shape[1] % INT8_STEP_COLS or not valid_launch(block_n, num_warps,
                                                                        num_stages)
            or not _runnable(x, qweight, out, max_rows(num_stages)) or scales.stride(0) != 1):
        return False
    ops.int8_gemv(out, x, qweight, scales, num_warps, num_stages, pdl)
    return True


def launch_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                    out: torch.Tensor, block_n: int, num_warps: int, num_stages: int,
                    pdl: bool) -> bool:
    """``out [M, N] = x @ (weight * scales[:, None]).T`` for e4m3 ``weight [N, K]`` and float
    ``scales [N]``; False (nothing launched) where the kernel does not take these inputs."""
    ops = _ops(build=True)
    if (ops is None or x.shape[1] % INT8_STEP_COLS or weight.dtype != torch.float8_e4m3fn
            or not valid_launch(block_n, num_warps, num_stages)
            or not _runnable(x, weight, out, max_rows(num_stages)) or scales.dim() != 1
            or scales.stride(0) != 1 or scales.shape[0] != weight.shape[0]):
        return False
    ops.fp8_gemv(out, x, weight, scales, num_warps, num_stages, pdl)
    return True


def fp8_w8a16_gemv(x: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor) -> torch.Tensor | None:
    """``x @ (weight * weight_scale[:, None]).T`` in x's dtype through the default launch, or
    None where the kernel does not take the inputs (no extension, more than ``FP8_MAX_M``
    rows, unaligned rows, a scale that is not one float per row)."""
    if not x.is_cuda or x.shape[0] > FP8_MAX_M or weight_scale.numel() != weight.shape[0]:
        return None
    n = weight.shape[0]
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block_n, warps, stages = default_launch(n, x.shape[1] // INT8_STEP_COLS, x.shape[0])
    scales = weight_scale.reshape(-1)
    if launch_fp8_gemv(x, weight, scales, out, block_n, warps, stages, _pdl.use_pdl(x)):
        return out
    return None


def launch_gguf_gemv(x: torch.Tensor, qweight: torch.Tensor, ggml_type: int, out: torch.Tensor,
                     num_warps: int, pdl: bool) -> bool:
    """``out [M, N] = x @ W.T`` for GGUF rows ``qweight`` (Q4_K blocks, or Q8_0 split rows);
    False (nothing launched) where the kernel does not take these inputs (another type, more
    than ``GGUF_MAX_M`` rows or, above 8, more than ``GGUF_TWO_TILE_WARPS`` warps, K not a
    multiple of the step, unaligned rows)."""
    cols = GGUF_STEP_COLS.get(ggml_type)
    if (cols is None or x.shape[1] % cols or not 1 <= num_warps <= 16
            or (x.shape[0] > STRIDED_MAX_M and num_warps > GGUF_TWO_TILE_WARPS)
            or qweight.dtype != torch.uint8 or not _runnable(x, qweight, out, GGUF_MAX_M)):
        return False
    ops = _ops(build=True)
    if ops is None:
        return False
    ops.gguf_gemv(out, x, qweight, ggml_type, num_warps, pdl)
    return True
