"""Attention cases of ``fuselm bench kernels``, and a standalone runner with TFLOP/s and KV GB/s.

- ``prefill_attention``: causal, 32 query / 8 KV heads, head size 128, batch 4 x 4096 and
  1 x 16384 tokens, against ``scaled_dot_product_attention`` with its FlashAttention and cuDNN
  backends (K/V expanded to 32 heads beforehand, outside the timing). TFLOP/s count the causal
  half: ``2 * 2 * B * H * D * S * (S + 1) / 2``.
- ``paged_attention`` (decode): 32 / 8 heads, head size 128, block size 16, blocks in random
  order, batch 64 x 4096 and 1 x 32768 context, against SDPA cuDNN (and flash) on the same KV
  stored contiguously ``[B, 8, ctx, 128]``, the group's 4 query heads folded into the query length
  so that it too reads each KV head once. GB/s count K and V read once.

``attention_cases(preset)`` feeds ``fuselm.bench.kernels`` (``CASE_PROVIDERS``); every Triton
config it offers for the sweep has been run once and checked against SDPA / the reference, so a
config that fails to compile or is wrong never reaches the tuning table (it is logged and the
sweep goes on).
``python -m fuselm.bench.kernels_attention --output-dir DIR [--configs-dir DIR]`` runs them alone;
``--ops prefill_attention`` keeps the two prefill shapes, ``--candidates L1,L2`` some sweep labels,
``--rep-ms`` sets each timing's budget. It prints the fastest swept config per case (the
``triton`` row runs the default or installed config), and gives a bucket that both prefill shapes
share the config that is best over both (``shared_bucket_configs``), not the last shape's best.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fuselm.bench import common
from fuselm.bench.kernel_cases import KernelCase
from fuselm.bench.kernels import (
    add_configs_arguments,
    check_targets,
    configs_note,
    resolve_configs_dir,
    tuning_tables,
    write_tuning_tables,
)

logger = logging.getLogger(__name__)

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
# (batch, tokens per sequence) per preset; tiny runs on the CPU interpreter.
PREFILL_SHAPES = {"full": [(4, 4096), (1, 16384)], "quick": [(4, 4096)], "tiny": [(2, 48)]}
DECODE_SHAPES = {"full": [(64, 4096), (1, 32768)], "quick": [(64, 4096)], "tiny": [(2, 80)]}
PREFILL_TARGETS = (("sdpa_flash", 1.3),)
DECODE_TARGETS = {(64, 4096): (("sdpa_cudnn", 0.9),), (1, 32768): (("sdpa_cudnn", 1.0),)}


def _prefill_candidate(block_m: int, block_n: int, num_warps: int, num_stages: int,
                       *switches: str) -> tuple[str, dict]:
    """(label, PrefillConfig fields), e.g. ``m128n64w8s3_fold_i32``."""
    fields = {"fold": "fold_scale", "i32": "narrow_offsets", "lean": "lean_edges"}
    label = "_".join([f"m{block_m}n{block_n}w{num_warps}s{num_stages}", *switches])
    config = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    return label, config | {fields[f]: True for f in switches}


# Launch configs the sweep tries (PrefillConfig / DecodeConfig fields). Prefill: 2 consumer
# warpgroups on a 128-row tile (FA2/FA3's shape on Hopper). The first two are the H100 winners so
# far (m128n64: S=4096, m128n128: S=16384; docs/perf/log/attention-notes.md); the others switch on
# the instruction cuts, alone and together: _fold (no multiply a score), _i32 (int32 key
# offsets), _lean (trims outside the main loop). TMA, hpp1, FA4's lazy rescale and 4-warp
# configs lost by 3-30 % on the H100 and are removed: 11 compiles, each timed for --rep-ms.
PREFILL_CANDIDATES = dict(_prefill_candidate(*c) for c in [
    (128, 64, 8, 3), (128, 128, 8, 3),
    (128, 64, 8, 3, "fold"), (128, 64, 8, 3, "i32"), (128, 64, 8, 3, "lean"),
    (128, 64, 8, 3, "fold", "i32"), (128, 64, 8, 3, "fold", "i32", "lean"),
    (128, 64, 8, 2, "fold", "i32", "lean"), (128, 64, 8, 4, "fold", "i32", "lean"),
    (128, 128, 8, 3, "fold", "i32", "lean"), (128, 128, 8, 2, "fold", "i32", "lean"),
])
DECODE_CANDIDATES = {
    "n64w4s3": dict(block_n=64, num_warps=4, num_stages=3),
    "n64w4s2": dict(block_n=64, num_warps=4, num_stages=2),
    "n32w4s4": dict(block_n=32, num_warps=4, num_stages=4),
    "n128w4s3": dict(block_n=128, num_warps=4, num_stages=3),
    "n64w8s3": dict(block_n=64, num_warps=8, num_stages=3),
    "n128w8s2": dict(block_n=128, num_warps=8, num_stages=2),
}


def _dims(device: torch.device) -> tuple[int, int, int]:
    return (HEADS, KV_HEADS, HEAD_SIZE) if device.type == "cuda" else (4, 2, 64)


def prefill_flops(batch: int, seq: int, heads: int = HEADS, head_size: int = HEAD_SIZE) -> float:
    """Causal attention FLOPs: QK^T and PV, 2 FLOPs a multiply-add, the causal half."""
    return 4.0 * batch * heads * head_size * seq * (seq + 1) / 2


# ---- prefill -----------------------------------------------------------------------------------


def _prefill_args(device, dtype, batch, seq):
    heads, kv_heads, head_size = _dims(device)
    tokens = batch * seq
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_size, device=device, dtype=dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cache = torch.zeros(1, BLOCK_SIZE, kv_heads, head_size, device=device, dtype=dtype)
    qsl = torch.arange(batch + 1, device=device, dtype=torch.int32) * seq
    seq_lens = torch.full((batch,), seq, device=device, dtype=torch.int32)
    block_tables = torch.zeros(batch, 1, device=device, dtype=torch.int32)
    return q, k, v, cache, cache, qsl, seq_lens, block_tables, head_size**-0.5


def _sdpa_prefill_layout(args):
    """q, k, v as SDPA's ``[B, H, S, D]`` (K/V expanded to every query head)."""
    q, k, v, _, _, _, seq_lens, _, _ = args
    batch, heads, group = seq_lens.shape[0], q.shape[1], q.shape[1] // k.shape[1]
    def bhsd(x):  # noqa: E306
        return x.reshape(batch, -1, *x.shape[1:]).transpose(1, 2)
    return (bhsd(q).contiguous(), bhsd(k).repeat_interleave(group, dim=1).contiguous(),
            bhsd(v).repeat_interleave(group, dim=1).contiguous(), batch, heads)


class SdpaPrefill:
    """SDPA with one backend, callable with prefill_attention's arguments (layout built once)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._key: tuple | None = None
        self._inputs: tuple = ()

    def __call__(self, *args):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        key = (args[0].data_ptr(), tuple(args[0].shape))
        if key != self._key:
            self._key, self._inputs = key, _sdpa_prefill_layout(args)[:3]
        with sdpa_kernel(getattr(SDPBackend, self.backend)):
            return F.scaled_dot_product_attention(*self._inputs, is_causal=True, scale=args[-1])


def _prefill_expected(args) -> torch.Tensor:
    q4, k4, v4, _, _ = _sdpa_prefill_layout(args)
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=args[-1])
    return out.transpose(1, 2).reshape(args[0].shape)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool(torch.allclose(actual.float(), expected.float(), atol=3e-2, rtol=3e-2))


def _prefill_variants(args, labels: tuple[str, ...] | None = None) -> dict[str, tuple[dict, Any]]:
    """The sweep's configs (``labels`` of PREFILL_CANDIDATES, default all) that compile and
    match SDPA; one that fails is logged and left out, the sweep goes on."""
    from fuselm.kernels.prefill_attention import PrefillConfig, prefill_attention_triton

    expected = _prefill_expected(args)
    out = torch.empty_like(args[0])
    found = {}
    for label in labels or PREFILL_CANDIDATES:
        fields = PREFILL_CANDIDATES[label]
        cfg = PrefillConfig(**fields)
        fn = lambda c=cfg: prefill_attention_triton(*args, config=c, out=out)  # noqa: E731
        if _runs_correctly(label, fn, out, expected):
            found[label] = (fields, fn)
    return found


def _runs_correctly(label: str, fn, out: torch.Tensor, expected: torch.Tensor) -> bool:
    try:
        out.fill_(float("nan"))
        fn()
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as err:  # e.g. out of shared memory: leave the config out of the sweep
        logger.warning("config %s dropped: %s", label, (str(err) or repr(err)).splitlines()[0])
        return False
    if not _close(out, expected):
        logger.warning("config %s dropped: wrong result (max diff %.3g)", label,
                       (out.float() - expected.float()).abs().nan_to_num(1e9).max().item())
        return False
    return True


def prefill_cases(preset: str, candidates: tuple[str, ...] | None = None) -> list[KernelCase]:
    """Causal prefill at the issue's shapes; bucket ``d128_<dtype>`` is the launch-config key.
    ``candidates``: labels of PREFILL_CANDIDATES to sweep (default all)."""
    from fuselm.kernels.prefill_attention import prefill_attention_ref

    unknown = set(candidates or ()) - set(PREFILL_CANDIDATES)
    if unknown:
        raise ValueError(f"unknown prefill candidates {sorted(unknown)}; "
                         f"known: {', '.join(PREFILL_CANDIDATES)}")
    cases = []
    for batch, seq in PREFILL_SHAPES[preset]:
        cases.append(KernelCase(
            "prefill_attention", f"causal_b{batch}_s{seq}",
            lambda device, dtype, b=batch, s=seq: _prefill_args(device, dtype, b, s),
            lambda a: (2 * a[0].numel() + a[1].numel() + a[2].numel()) * a[0].element_size(),
            prefill_attention_ref,
            bucket=None if preset == "tiny" else "d128_bfloat16",
            baselines={"sdpa_flash": lambda: SdpaPrefill("FLASH_ATTENTION"),
                       "sdpa_cudnn": lambda: SdpaPrefill("CUDNN_ATTENTION")},
            triton_variants=lambda a, c=candidates: _prefill_variants(a, c),
            targets=() if preset == "tiny" else PREFILL_TARGETS,
        ))  # fmt: skip
    return cases


# ---- decode ------------------------------------------------------------------------------------


def _decode_args(device, dtype, batch, ctx):
    heads, kv_heads, head_size = _dims(device)
    blocks_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_size)
    key_cache = torch.randn(shape, device=device, dtype=dtype)
    value_cache = torch.randn(shape, device=device, dtype=dtype)
    block_tables = torch.randperm(num_blocks, device=device).to(torch.int32)
    block_tables = block_tables.view(batch, blocks_per_seq)
    q = torch.randn(batch, heads, head_size, device=device, dtype=dtype)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    return q, key_cache, value_cache, block_tables, seq_lens, head_size**-0.5


def decode_kv_bytes(args) -> int:
    """K and V read once, plus q read and the output written."""
    q, key_cache, _, _, seq_lens, _ = args
    kv = 2 * int(seq_lens.sum()) * key_cache.shape[2] * key_cache.shape[3]
    return (kv + 2 * q.numel()) * q.element_size()


class SdpaDecode:
    """SDPA on the same KV stored contiguously ``[B, Hkv, ctx, D]``, q as ``[B, Hkv, group, D]``
    (non-causal: each KV head read once for its group), with paged_attention's arguments."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._key: tuple | None = None
        self._inputs: tuple = ()

    def _layout(self, q, key_cache, value_cache, block_tables, seq_lens):
        batch, heads, head_size = q.shape
        kv_heads, ctx = key_cache.shape[2], int(seq_lens.max())
        def contiguous(cache):  # noqa: E306
            rows = cache[block_tables.long()].reshape(batch, -1, kv_heads, head_size)[:, :ctx]
            return rows.transpose(1, 2).contiguous()
        return contiguous(key_cache), contiguous(value_cache), (batch, kv_heads, -1, head_size)

    def __call__(self, q, key_cache, value_cache, block_tables, seq_lens, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        key = (key_cache.data_ptr(), q.data_ptr(), tuple(q.shape))
        if key != self._key:
            self._key = key
            self._inputs = self._layout(q, key_cache, value_cache, block_tables, seq_lens)
        k, v, q_shape = self._inputs
        with sdpa_kernel(getattr(SDPBackend, self.backend)):
            out = F.scaled_dot_product_attention(q.view(q_shape), k, v, scale=scale)
        return out.view(q.shape)


def _decode_variants(args) -> dict[str, tuple[dict, Any]]:
    from fuselm.kernels import paged_attention as pa

    q, key_cache, _, block_tables, seq_lens, _ = args
    expected = pa.paged_attention_ref(*args)
    max_len = block_tables.shape[1] * key_cache.shape[1]
    ws = pa.PagedAttentionWorkspace(q.shape[0], q.shape[1], q.shape[2], max_len, q.device)
    out = torch.empty_like(q)
    size, tmp_out, max_logits, exp_sums = ws.buffers(q.shape[0])
    found = {}
    for label, fields in DECODE_CANDIDATES.items():
        cfg = pa.DecodeConfig(**fields)._replace(block_n=min(fields["block_n"], size))
        fn = lambda c=cfg: pa.paged_attention_triton_out(  # noqa: E731
            out, tmp_out, max_logits, exp_sums, *args, size, c)
        if _runs_correctly(label, fn, out, expected):
            found[label] = (fields, fn)
    return found


def decode_cases(preset: str) -> list[KernelCase]:
    """Paged decode at the issue's shapes; bucket ``d128_<dtype>`` is the launch-config key."""
    from fuselm.kernels.paged_attention import paged_attention_ref

    cases = []
    for batch, ctx in DECODE_SHAPES[preset]:
        cases.append(KernelCase(
            "paged_attention", f"decode_b{batch}_ctx{ctx}",
            lambda device, dtype, b=batch, c=ctx: _decode_args(device, dtype, b, c),
            decode_kv_bytes, paged_attention_ref,
            bucket=None if preset == "tiny" else "d128_bfloat16",
            baselines={"sdpa_cudnn": lambda: SdpaDecode("CUDNN_ATTENTION"),
                       "sdpa_flash": lambda: SdpaDecode("FLASH_ATTENTION")},
            triton_variants=_decode_variants,
            targets=DECODE_TARGETS.get((batch, ctx), ()),
        ))  # fmt: skip
    return cases


def attention_cases(preset: str,
                    prefill_candidates: tuple[str, ...] | None = None) -> list[KernelCase]:
    """Every attention case of ``preset`` (``full``, ``quick`` or ``tiny``)."""
    return prefill_cases(preset, prefill_candidates) + decode_cases(preset)


# ---- standalone runner -------------------------------------------------------------------------

COLUMNS = ("op", "shape", "backend", "us", "TFLOP/s", "GB/s", "x_sdpa_flash", "x_sdpa_cudnn")


def measure(case: KernelCase, device: torch.device, dtype: torch.dtype, *, reference: bool,
            sweep: bool, rep_ms: float = 100) -> list[dict[str, Any]]:
    """Rows of one case: each backend, baseline and swept config, with TFLOP/s (prefill) or KV
    GB/s (decode) and the time ratios to the SDPA baselines (> 1: faster than SDPA)."""
    from fuselm.kernels import available_backends, resolve

    torch.manual_seed(0)
    args = case.make_args(device, dtype)
    fns: dict[str, Any] = {name: make() for name, make in case.baselines.items()}
    if reference:
        fns["eager"] = case.reference
    for backend in ("triton", "cuda"):
        if backend in available_backends(case.op) and (device.type == "cuda" or
                                                       backend == "triton"):
            fns[backend] = resolve(case.op, backend, device)
    configs: dict[str, dict] = {}
    if sweep and case.triton_variants is not None and "triton" in fns:
        for label, (cfg, fn) in case.triton_variants(args).items():
            fns[f"triton[{label}]"] = lambda *_, f=fn: f()
            configs[f"triton[{label}]"] = cfg
    times = {}
    for name, fn in fns.items():
        try:
            times[name] = common.time_ms(lambda f=fn: f(*args), device, rep_ms) * 1e3
        except Exception as err:  # a baseline this torch/GPU lacks must not stop the run
            logger.warning("%s %s %s failed: %s", case.op, case.shape, name,
                           str(err).splitlines()[0] if str(err) else err)
    flops = None
    if case.op == "prefill_attention":  # args[5]: query_start_loc of equal-length sequences
        batch, seq = args[6].shape[0], int(args[5][1])
        flops = prefill_flops(batch, seq, args[0].shape[1], args[0].shape[2])
    nbytes = case.bytes_moved(args)
    rows = []
    for name, us in times.items():
        ratios = {b: times[b] / us for b in case.baselines if b in times}
        rows.append({"op": case.op, "shape": case.shape, "backend": name, "us": us,
                     "TFLOP/s": flops / (us * 1e-6) / 1e12 if flops else None,
                     "GB/s": nbytes / (us * 1e-6) / 1e9,
                     "x_sdpa_flash": ratios.get("sdpa_flash"),
                     "x_sdpa_cudnn": ratios.get("sdpa_cudnn"), "ratios": ratios,
                     "bucket": case.bucket, "config": configs.get(name), "bytes": nbytes,
                     "flops": flops})  # fmt: skip
    return rows


def best_swept(cases: list[KernelCase], rows: list[dict]) -> list[dict[str, Any]]:
    """Per case: the fastest swept Triton config and its ratios to the case's target baselines
    (the ``triton`` row runs the current default or tuned config, not the sweep's best)."""
    out = []
    for case in cases:
        swept = [r for r in rows if (r["op"], r["shape"]) == (case.op, case.shape)
                 and r["config"] is not None]  # fmt: skip
        if not swept:
            continue
        best = min(swept, key=lambda r: r["us"])
        entry = {"op": case.op, "shape": case.shape, "config": best["backend"], "us": best["us"],
                 "TFLOP/s": best["TFLOP/s"]}
        for baseline, minimum in case.targets:
            if baseline in best["ratios"]:
                entry[f"x_{baseline}"] = best["ratios"][baseline]
                entry["met"] = "yes" if best["ratios"][baseline] >= minimum else "NO"
        out.append(entry)
    return out


def shared_bucket_configs(cases: list[KernelCase], rows: list[dict]) -> dict[tuple, dict]:
    """(op, bucket) -> Triton config, for buckets that several cases share (``tuning_tables``
    keeps the last case's best, e.g. S=16384's for both prefill shapes): among the configs swept
    in every such case, those that meet every case's targets first, then the lowest geometric
    mean of their time over each case's fastest swept time."""
    groups: dict[tuple, list[KernelCase]] = {}
    for case in cases:
        if case.bucket is not None:
            groups.setdefault((case.op, case.bucket), []).append(case)
    chosen = {}
    for key, group in groups.items():
        swept = [{r["backend"]: r for r in rows if (r["op"], r["shape"]) == (c.op, c.shape)
                  and r["config"] is not None} for c in group]  # fmt: skip
        labels = sorted(set.intersection(*(set(s) for s in swept)))
        if len(group) < 2 or not labels:
            continue

        def score(label: str, group=group, swept=swept) -> tuple[bool, float]:
            met = all((sw[label]["ratios"].get(b) or 0.0) >= minimum
                      for case, sw in zip(group, swept, strict=True)
                      for b, minimum in case.targets if b != "copy")  # fmt: skip
            logs = [math.log(sw[label]["us"] / min(r["us"] for r in sw.values())) for sw in swept]
            return not met, math.exp(sum(logs) / len(logs))

        chosen[key] = swept[0][min(labels, key=score)]["config"]
    return chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures every case, prints tables and targets, writes JSON (and tuning tables)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)  # fmt: skip
    ops = set(args.ops.split(",")) if args.ops else None
    candidates = tuple(args.candidates.split(",")) if args.candidates else None
    cases = [c for c in attention_cases(args.preset, candidates) if ops is None or c.op in ops]
    env = common.environment()
    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"{env.get('gpu') or 'cpu'}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    path = Path(args.output_dir) / f"attention-{common.gpu_slug(env.get('gpu'))}.json"
    result: dict[str, Any] = {"environment": env, "dtype": str(dtype).removeprefix("torch."),
                              "copy_gbs": copy_gbs, "rows": [], "targets": []}
    for case in cases:
        case_rows = measure(case, device, dtype, reference=args.reference, sweep=not args.no_sweep,
                            rep_ms=args.rep_ms)
        for row in case_rows:
            row["%copy"] = 100 * row["GB/s"] / copy_gbs
        print(common.format_table(case_rows, COLUMNS), flush=True)
        result["rows"] += case_rows
        result["targets"] = check_targets(cases, result["rows"])
        result["best_swept"] = best_swept(cases, result["rows"])
        common.write_json(path, result)  # after every case: a timeout keeps what was measured
    configs_dir = resolve_configs_dir(args)
    if device.type == "cuda" and configs_dir is not None:
        result["tuning"] = tuning_tables(result["rows"])
        for (op, bucket), config in shared_bucket_configs(cases, result["rows"]).items():
            if bucket in result["tuning"].get(op, {}):
                result["tuning"][op][bucket]["triton"] = config
        written = write_tuning_tables(result["tuning"], env["gpu"], configs_dir)
        result["configs_written"] = [str(p) for p in written]
        common.write_json(path, result)
        print(configs_note(configs_dir))
    if result["best_swept"]:
        columns = list(dict.fromkeys(k for row in result["best_swept"] for k in row))
        print("\nfastest swept config per case:\n"
              + common.format_table(result["best_swept"], columns))
    if result["targets"]:
        print("\n" + common.format_table(result["targets"]))
    print(f"wrote {path}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m fuselm.bench.kernels_attention``."""
    parser = argparse.ArgumentParser(prog="kernels_attention", description=__doc__)
    parser.add_argument("--preset", choices=tuple(PREFILL_SHAPES), default="full")
    parser.add_argument("--ops", default=None, help="prefill_attention,paged_attention")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--reference", action="store_true", help="also time the eager *_ref")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Triton config sweep")
    parser.add_argument("--candidates", default=None,
                        help="comma-separated labels of PREFILL_CANDIDATES to sweep (default all)")
    parser.add_argument("--rep-ms", type=float, default=100,
                        help="timing budget of each backend and config (ms, median reported)")
    parser.add_argument("--output-dir", default="docs/perf")
    add_configs_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m fuselm.bench.kernels_attention [flags]``."""
    parser = build_parser()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run(parser.parse_args(argv))
    return 0 if all(t["met"] == "yes" for t in result["targets"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
