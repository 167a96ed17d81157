"""``fuselm bench latency``: per-token latency over batch sizes x prompt lengths x output lengths.

For each shape, ``batch_size`` random prompts of ``input_len`` tokens decode ``output_len`` tokens
each (greedy, EOS ignored) through ``LLMEngine.step``; every step is timed on the host (a step ends
when its sampled tokens are on the host). Reported per shape:

- time to first token (TTFT: all prompts arrive together, so it includes the batch's prefill);
- per-token latency = duration of each step in which every sequence decodes (median, p90, p99);
- achieved bandwidth = bytes a decode step reads (``fuselm.planner.decode_step_bytes``: layers and
  LM head whole, one embedding row per sequence, the KV of the mean context) / median step time,
  and its fraction of the device's copy bandwidth measured in the same run (CUDA only);
- prefill FLOP/s = prefill FLOPs / (last first-token time), and its fraction of the spec peak
  (CUDA, 16-bit dtypes only);
- peak GPU memory (CUDA only).

``--compare hf`` runs the same token ids through Hugging Face ``transformers`` in this process
(same config and weights; random weights of the same config with ``--load-format dummy``), decoding
greedily with its KV cache, and prints fuselm's speedup next to it. The HF model runs first and is
freed before fuselm's engine reserves its KV cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import inspect
import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fuselm.bench import plots, report
from fuselm.planner import StepBytes, decode_step_bytes, shard_shape

NAME = "latency"
H200_COPY_GBS = 4270.0  # measured device-to-device copy bandwidth of the H200 (read + write)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm bench latency`` (engine flags come from ``fuselm.cli_args``)."""
    a = parser.add_argument
    a("--batch-size", type=int, nargs="+", default=[1], help="batch sizes to sweep")
    a("--input-len", type=int, nargs="+", default=[32], help="prompt lengths to sweep")
    a("--output-len", type=int, nargs="+", default=[128], help="output lengths to sweep")
    a("--num-iters-warmup", type=int, default=1, help="untimed runs of each shape")
    a("--num-iters", type=int, default=3, help="timed runs of each shape")
    a("--compare", choices=("hf",), default=None,
      help="also run Hugging Face transformers on the same workload")
    a("--disable-detokenize", action="store_true", help="time without incremental detokenizing")
    a("--output-json", default=None, help="write the results here")
    a("--plot", default=None, help="write latency vs batch size (PNG) here")
    a("--disable-tqdm", action="store_true")


@dataclass(frozen=True)
class Shape:
    batch_size: int
    input_len: int
    output_len: int


@dataclass
class Timings:
    """Host-side timings of one engine over the iterations of one shape (seconds)."""

    ttft: list[float]
    step: list[float]
    prefill: list[float]
    peak_memory_gib: float | None = None


def _shapes(args: argparse.Namespace) -> list[Shape]:
    shapes = [Shape(b, i, o) for b, i, o in
              itertools.product(args.batch_size, args.input_len, args.output_len)]
    if any(min(s.batch_size, s.input_len, s.output_len) < 1 for s in shapes):
        raise ValueError("batch sizes and lengths must be at least 1")
    return shapes


def make_prompts(vocab_size: int, shape: Shape, seed: int) -> list[list[int]]:
    """Fresh random prompts (no shared prefix, so the prefix cache cannot help)."""
    rng = np.random.default_rng(seed)
    return [report.random_token_ids(vocab_size, shape.input_len, rng)
            for _ in range(shape.batch_size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(engine: Any, prompts: list[list[int]], output_len: int, tag: str,
                detokenize: bool = True) -> Timings:
    """Runs the prompts to completion, timing every step; ``tag`` keeps request ids unique."""
    from fuselm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                            detokenize=detokenize)
    ids = [f"bench-{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    first: dict[str, float] = {}
    steps: list[float] = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        all_decoding = len(first) == len(ids)
        for o in outs:
            if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                first[o.request_id] = t1 - start
        if all_decoding and outs:
            steps.append(t1 - t0)
    ttft = [first[r] for r in ids if r in first]
    return Timings(ttft=ttft, step=steps, prefill=[max(ttft)] if ttft else [])


def _measure(run_once: Any, shape: Shape, args: argparse.Namespace, vocab: int,
             device: torch.device, label: str) -> Timings:
    """Warmup then timed iterations of ``run_once(prompts, output_len, tag)``."""
    seed = report.workload_seed(args)
    total = Timings([], [], [])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n = args.num_iters_warmup + args.num_iters
    desc = f"{label} b={shape.batch_size} in={shape.input_len} out={shape.output_len}"
    for it in report.progress(range(n), total=n, desc=desc, disable=args.disable_tqdm):
        prompts = make_prompts(vocab, shape, seed + 7919 * it + shape.batch_size)
        t = run_once(prompts, shape.output_len, f"{label}{shape.batch_size}.{shape.input_len}."
                     f"{shape.output_len}.{it}")
        if it >= args.num_iters_warmup:
            total.ttft += t.ttft
            total.step += t.step
            total.prefill += t.prefill
    if device.type == "cuda":
        total.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return total


def measure_copy_bandwidth(device: torch.device) -> float | None:
    """The card's device-to-device copy bandwidth in GB/s (``bench.common``); None off CUDA,
    where the bandwidth fraction is not reported."""
    if device.type != "cuda":
        return None
    from fuselm.bench.common import copy_bandwidth_gbs

    bw = copy_bandwidth_gbs(device)
    torch.cuda.empty_cache()
    return bw


@dataclass(frozen=True)
class ModelBytes:
    """Element sizes of the loaded model's weights and KV cache (what ``decode_step_bytes``
    counts a decode step's reads with), and matmul parameters per token (prefill FLOPs)."""

    element_size: int
    kv_element_size: int
    matmul_params: int
    quantized_weight_bytes: int | None = None
    """A quantized model's weight bytes per step, measured from its layers (packed weights,
    scales, zeros, norms); None: counted from the shape at ``element_size``."""

    def step(self, m: Any, batch: int, kv_tokens: float) -> StepBytes:
        """What one decode step reads: ``fuselm.planner.decode_step_bytes``."""
        sb = decode_step_bytes(m, batch, self.element_size, kv_tokens, self.kv_element_size)
        if self.quantized_weight_bytes is None:
            return sb
        return dataclasses.replace(sb, weights=float(self.quantized_weight_bytes))


def model_bytes(model: torch.nn.Module, model_config: Any, kv_dtype: torch.dtype) -> ModelBytes:
    """The weights' element size (of the first parameter), the KV cache's, and the matmul
    parameters per token of ``model_config``."""
    s = shard_shape(model_config, 1)
    element_size = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    quantized = None
    if getattr(model_config, "quantization", None) is not None:
        from fuselm.layers.quantization import weight_bytes_per_step

        norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if "norm" in n)
        quantized = weight_bytes_per_step(model) + norms
    return ModelBytes(element_size=element_size,
                      kv_element_size=torch.empty(0, dtype=kv_dtype).element_size(),
                      matmul_params=model_config.num_hidden_layers * s.layer_matmul,
                      quantized_weight_bytes=quantized)


def prefill_flops(m: Any, mb: ModelBytes, shape: Shape) -> float:
    """FLOPs of the prefill: 2 x matmul params per token, causal attention (QK^T and PV over
    n(n+1)/2 pairs per head), and the LM head for the last token of each sequence."""
    n = shape.input_len
    attn = 2 * 2 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * n * (n + 1) / 2
    per_seq = 2 * mb.matmul_params * n + attn + 2 * m.hidden_size * m.vocab_size
    return shape.batch_size * per_seq


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Spec dense 16-bit tensor-core peak of this GPU, or None (CPU, fp32, unknown GPU)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    from fuselm.planner_hardware import gpu_from_device_name

    spec = gpu_from_device_name(torch.cuda.get_device_name(device))
    return spec.bf16_tflops if spec else None


def summarize_shape(shape: Shape, t: Timings, mb: ModelBytes, m: Any, copy_gbs: float | None,
                    peak: float | None) -> dict[str, Any]:
    """One result row: TTFT, per-token latency stats, bandwidth and FLOP utilisation."""
    step = report.summarize(t.step, 1e3)
    ttft = report.summarize(t.ttft, 1e3)
    row: dict[str, Any] = {**shape.__dict__, "ttft_ms": ttft, "per_token_ms": step,
                           "num_decode_steps": len(t.step),
                           "decode_tok_s": shape.batch_size / step["median"] * 1e3
                           if t.step else None, "peak_memory_gib": t.peak_memory_gib}
    ctx = shape.input_len + shape.output_len / 2  # mean context over the decode steps
    sb = mb.step(m, shape.batch_size, ctx)
    step_bytes = sb.total
    gbs = step_bytes / (step["median"] / 1e3) / 1e9 if t.step else None
    row.update(bytes_per_step=step_bytes, weight_bytes_per_step=sb.weights,
               embedding_bytes_per_step=sb.embedding, kv_bytes_per_step=sb.kv, achieved_gbs=gbs,
               bandwidth_fraction=gbs / copy_gbs if gbs and copy_gbs else None)
    prefill_s = float(np.median(t.prefill)) if t.prefill else None
    tflops = prefill_flops(m, mb, shape) / prefill_s / 1e12 if prefill_s else None
    row.update(prefill_tflops=tflops, prefill_flops_fraction=tflops / peak
               if tflops and peak else None)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        line = {"batch": r["batch_size"], "in": r["input_len"], "out": r["output_len"],
                "TTFT ms": r["ttft_ms"]["median"], "tok ms p50": r["per_token_ms"]["median"],
                "p90": r["per_token_ms"]["p90"], "p99": r["per_token_ms"]["p99"],
                "tok/s": r["decode_tok_s"], "GB/step": r["bytes_per_step"] / 1e9,
                "GB/s": r["achieved_gbs"],
                "%copy bw": _pct(r["bandwidth_fraction"]),
                "prefill TFLOP/s": r["prefill_tflops"],
                "%peak": _pct(r["prefill_flops_fraction"]), "peak GiB": r["peak_memory_gib"]}
        if "hf" in r:
            line.update({"hf tok ms": r["hf"]["per_token_ms"]["median"],
                         "hf TTFT ms": r["hf"]["ttft_ms"]["median"],
                         "speedup tok": r["speedup_per_token"], "speedup TTFT": r["speedup_ttft"]})
        out.append(line)
    return report.format_table(out)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def load_hf_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device, int]:
    """The same model in ``transformers`` (same config; same weights unless --load-format dummy,
    then HF's own random init of the same shapes), on the engine's device and dtype."""
    import transformers

    from fuselm.loading import loader

    llm = getattr(args, "llm", None)
    if llm is not None:
        cfg = llm.config
    else:
        from fuselm.cli_args import engine_config_from_args

        cfg = engine_config_from_args(args)
    load_format = vars(args).get("engine.load_format") or cfg.load_format
    source = loader.resolve_model(cfg.model)
    cfg_dict = {**loader.load_config_dict(source), **cfg.hf_overrides}
    device = loader.resolve_device(cfg.device)
    dtype = loader.resolve_dtype(cfg.dtype, device)
    model_type = cfg_dict.pop("model_type", None) or "llama"
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    if load_format != "dummy":
        state = model.state_dict()
        with torch.no_grad():
            for name, value in loader.iterate_weights(source):
                tensor = value if isinstance(value, torch.Tensor) else value[:]
                if name not in state:
                    raise KeyError(f"transformers' model has no parameter {name}")
                state[name].copy_(tensor.to(state[name].dtype))
    return model.eval(), device, int(cfg_dict["vocab_size"])


def hf_time_once(model: torch.nn.Module, device: torch.device, prompts: list[list[int]],
                 output_len: int, tag: str = "") -> Timings:
    """Greedy decoding with transformers' KV cache, every forward timed (token on the host)."""
    ids = torch.tensor(prompts, device=device)
    # transformers >= 5 names the KV cache argument ``cache``; older ones ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    steps = []
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.cpu()
        ttft = time.perf_counter() - start
        for _ in range(output_len - 1):
            t0 = time.perf_counter()
            cache = getattr(out, cache_arg)
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.cpu()
            steps.append(time.perf_counter() - t0)
    return Timings([ttft] * len(prompts), steps, [ttft])


def run_hf(args: argparse.Namespace, shapes: list[Shape]) -> list[dict[str, Any]]:
    """TTFT and per-token latency of transformers on each shape; frees the model after."""
    model, device, vocab = load_hf_model(args)

    once = functools.partial(hf_time_once, model, device)
    rows = []
    for shape in shapes:
        t = _measure(once, shape, args, vocab, device, "hf")
        rows.append({"ttft_ms": report.summarize(t.ttft, 1e3),
                     "per_token_ms": report.summarize(t.step, 1e3),
                     "peak_memory_gib": t.peak_memory_gib})
    del once, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the sweep (and the HF baseline with --compare hf); prints, writes JSON/PNG."""
    shapes = _shapes(args)
    hf_rows = None
    if args.compare == "hf":
        hf_rows = run_hf(args, shapes)
    llm = report.build_llm(args)
    engine = llm.engine
    model = engine.runner.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kv_dtype = engine.runner.kv_caches[0][0].dtype if engine.runner.kv_caches else dtype
    m = llm.model_config
    mb = model_bytes(model, m, kv_dtype)
    copy_gbs = measure_copy_bandwidth(device)
    peak = peak_tflops(device, dtype)
    quant = m.quantization.describe() if getattr(m, "quantization", None) else "none"

    def once(prompts: list[list[int]], out_len: int, tag: str) -> Timings:
        return time_engine(engine, prompts, out_len, tag, not args.disable_detokenize)

    rows = []
    for shape in shapes:
        t = _measure(once, shape, args, m.vocab_size, device, "fuselm")
        rows.append(summarize_shape(shape, t, mb, m, copy_gbs, peak))
    if hf_rows is not None:
        for row, hf in zip(rows, hf_rows, strict=True):
            row["hf"] = hf
            row["speedup_per_token"] = hf["per_token_ms"]["median"] / row["per_token_ms"]["median"]
            row["speedup_ttft"] = hf["ttft_ms"]["median"] / row["ttft_ms"]["median"]
    result = {
        "bench": NAME, "env": report.environment(), "model": getattr(engine, "model_name", None),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "copy_bandwidth_gbs": copy_gbs, "peak_tflops": peak, "quantization": quant,
        "weight_read_bytes": mb.step(m, 1, 0).weights,
        "embedding_row_bytes": mb.step(m, 1, 0).embedding,
        "kv_bytes_per_token": mb.step(m, 1, 1).kv,
        "num_iters": args.num_iters, "results": rows,
    }
    print(f"quantization: {quant}; weights read per decode step "
          f"{mb.step(m, 1, 0).weights / 1e9:.3f} GB; H200 copy ceiling "
          f"{H200_COPY_GBS:.0f} GB/s" + (f", this card's {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    for r in rows:
        step_ms = r["per_token_ms"]["median"] if r["num_decode_steps"] else None
        print(f"batch {r['batch_size']} in {r['input_len']} out {r['output_len']}: "
              + mb.step(m, r["batch_size"], r["input_len"] + r["output_len"] / 2)
              .describe(step_ms, copy_gbs))
    gc.collect()
    return report.finish(args, result, _table(rows), plots.plot_latency)
