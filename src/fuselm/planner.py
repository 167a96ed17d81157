"""Memory and parallelism planner: which TP x PP layouts of a model fit a cluster, and how fast.

Pure arithmetic on a model's shape, GPU spec sheets (``planner_hardware``) and a cluster; no GPU
needed. Per GPU of each pipeline stage: weights (layer shards + embedding on the first stage, LM
head on the last), activations of one ``max_num_batched_tokens`` forward plus the logits, a fixed
overhead, and the KV cache in what is left. Decode step time of a stage = max(bytes read /
bandwidth, FLOPs / FLOP/s) + collectives (two all-reduces per layer, ``latency + 2(n-1)/n x bytes
/ link bandwidth``); batch-1 latency sums the stages and the (pp-1) point-to-point hops; peak
throughput keeps pp micro-batches of the largest batch whose KV fits in flight. The formulas and
every constant's source are in docs/perf/log/planner.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fuselm.cli_args import field_docs
from fuselm.config import ModelConfig
from fuselm.planner_hardware import (
    GB,
    GIB,
    GPUS,
    MEASURED_COPY_GBS,
    ClusterSpec,
    GPUSpec,
    collective_seconds,
    dtype_bytes,
    get_gpu,
    h2d_gbs,
    load_model_shape,
)


@dataclass(frozen=True)
class PlanOptions:
    """Workload, engine settings and efficiencies (the only non-spec-sheet numbers)."""

    dtype: str = "bfloat16"
    """Activation dtype (and weight dtype when ``weight_dtype`` is auto)."""
    weight_dtype: str = "auto"
    """auto (= dtype), or int8 / fp8 / int4 for quantized weights."""
    kv_cache_dtype: str = "auto"
    """auto (= dtype) or fp8."""
    context_len: int = 4096
    """Tokens a sequence holds (prompt + output) for latency, throughput and capacity."""
    batch_size: int = 1
    """Sequences whose KV cache the memory breakdown shows."""
    max_num_seqs: int = 256
    """Most sequences in one engine step (one micro-batch with PP)."""
    max_num_batched_tokens: int = 8192
    """Most tokens in one step: sizes the activation memory."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory the engine may use."""
    block_size: int = 16
    """Tokens per KV block: capacity is rounded down to whole blocks."""
    mem_bandwidth_gbs: float | None = None
    """Measured HBM copy bandwidth (GB/s); overrides mem_bw_efficiency x the spec peak."""
    mem_bw_efficiency: float = 0.9
    """Fraction of the spec HBM bandwidth that a streaming kernel reaches."""
    flops_efficiency: float = 0.7
    """Fraction of the dense BF16 peak that large GEMMs reach."""
    comm_efficiency: float = 0.8
    """Fraction of the link bandwidth that NCCL's bus bandwidth reaches on large messages."""
    allreduce_latency_us: float = 10.0
    """Fixed cost of one small collective inside a node."""
    inter_node_latency_us: float = 25.0
    """Fixed cost of one small collective or p2p message across nodes."""
    p2p_latency_us: float = 10.0
    """Fixed cost of one send/recv of the hidden state inside a node."""
    overhead_gib: float = 1.0
    """Per-GPU memory outside torch's allocator: CUDA context, NCCL, cuBLAS, CUDA graphs."""
    kernels_per_layer: int = 10
    """Kernels a decoder layer launches in fuselm's batch-1 decode graph (2 norms, 4 GEMVs,
    rotary + KV write, attention + its reduction, SiLU-and-mul): counted, not fitted."""
    kernel_gap_us: float = 1.5
    """Time a tiny kernel costs inside a CUDA graph (launch + drain), from the micro-benchmark
    ``scripts/graph_kernel_gap.py``; added per kernel to memory-bound decode steps."""
    cpu_offload_gb: float = 0.0
    """GiB of whole decoder layers per GPU kept in pinned CPU memory and streamed in each step
    (``--cpu-offload-gb``: layers are counted until this much is offloaded)."""
    h2d_bandwidth_gbs: float | None = None
    """Pinned host-to-device GB/s the offloaded weights stream at; None: the GPU's measured
    figure (``planner_hardware.h2d_gbs``)."""

    @property
    def weight_bytes(self) -> float:
        return dtype_bytes(self.dtype if self.weight_dtype == "auto" else self.weight_dtype)

    @property
    def act_bytes(self) -> float:
        return dtype_bytes(self.dtype)

    @property
    def kv_bytes(self) -> float:
        return dtype_bytes(self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype)

    def validate(self) -> None:
        """ValueError naming the first out-of-range option."""
        for name in ("context_len", "batch_size", "max_num_seqs", "max_num_batched_tokens",
                     "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.cpu_offload_gb < 0:
            raise ValueError("cpu_offload_gb must be >= 0")
        for name in ("gpu_memory_utilization", "mem_bw_efficiency", "flops_efficiency",
                     "comm_efficiency"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")


@dataclass(frozen=True)
class ShardShape:
    """Parameter counts of one TP rank (tp_size ranks split each layer)."""

    layer_matmul: int
    """Matmul weights of one decoder layer on one rank (QKV, o, gate/up, down)."""
    layer_other: int
    """Replicated per-layer params (two RMSNorm weights) and QKV biases of one rank."""
    embedding: int
    lm_head: int
    final_norm: int
    kv_heads_per_rank: int
    heads_per_rank: int


def shard_shape(m: ModelConfig, tp: int) -> ShardShape:
    """Per-rank parameter counts of ``m`` split over ``tp`` ranks (Megatron-style)."""
    h, hd = m.hidden_size, m.head_dim
    heads = m.num_attention_heads // tp
    kv_heads = max(1, m.num_key_value_heads // tp)  # replicated when tp > num_kv_heads
    inter = math.ceil(m.intermediate_size / tp)
    attn = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h
    bias = (heads + 2 * kv_heads) * hd if m.attention_bias else 0
    vocab = math.ceil(m.vocab_size / tp)
    return ShardShape(
        layer_matmul=attn + 3 * h * inter, layer_other=2 * h + bias,
        embedding=vocab * h, lm_head=0 if m.tie_word_embeddings else vocab * h,
        final_norm=h, kv_heads_per_rank=kv_heads, heads_per_rank=heads,
    )


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads on one GPU (the whole model when tp=1). The decoder layers,
    the final norm and the LM head are read whole; the embedding table is gathered, one row per
    token of the step (at most: a vocab-parallel rank reads only the rows in its range); the KV
    cache is read for every token of every sequence's context."""

    weights: float
    embedding: float
    kv: float

    @property
    def total(self) -> float:
        return self.weights + self.embedding + self.kv

    def describe(self, step_ms: float | None = None, copy_gbs: float | None = None) -> str:
        """``bytes counted`` and, given the step time and the card's copy ceiling, the achieved
        bandwidth and its fraction of that ceiling."""
        text = (f"{self.total / 1e9:.3f} GB/step (weights+head {self.weights / 1e9:.3f} GB read "
                f"whole, embedding {self.embedding / 1e3:.1f} KB gathered, KV "
                f"{self.kv / 1e6:.1f} MB)")
        if step_ms:
            gbs = self.total / (step_ms * 1e-3) / GB
            text += f" -> {gbs:.0f} GB/s"
            if copy_gbs:
                text += f" = {100 * gbs / copy_gbs:.1f} % of the {copy_gbs:.0f} GB/s copy ceiling"
        return text


def embedding_gather_bytes(m: ModelConfig, tokens: float, dtype: Any) -> float:
    """Bytes the embedding lookup reads for ``tokens`` tokens: one row of the table each."""
    return tokens * m.hidden_size * dtype_bytes(dtype)


def decode_step_bytes(m: ModelConfig, batch: int, dtype: Any, kv_tokens: float,
                      kv_dtype: Any = None, tp: int = 1) -> StepBytes:
    """What one decode step of ``batch`` sequences reads, each sequence with ``kv_tokens``
    tokens of context (a mean is fine): see ``StepBytes``. ``dtype`` (a name, a torch dtype or
    bytes per element) is the weights'; ``kv_dtype`` the KV cache's (default: ``dtype``).
    The one count of bytes per step of ``fuselm bench latency``, ``scripts/bench_engine.py`` and
    the planner."""
    s = shard_shape(m, tp)
    head = s.lm_head or s.embedding  # a tied head reads the embedding matrix whole
    weights = (m.num_hidden_layers * (s.layer_matmul + s.layer_other) + s.final_norm + head)
    kv_per_token = 2 * m.num_hidden_layers * s.kv_heads_per_rank * m.head_dim
    return StepBytes(
        weights=weights * dtype_bytes(dtype),
        embedding=embedding_gather_bytes(m, batch, dtype),
        kv=batch * kv_tokens * kv_per_token * dtype_bytes(kv_dtype if kv_dtype else dtype))


def copy_ceiling_gbs(device_name: str) -> float | None:
    """The measured copy bandwidth of a known card (``MEASURED_COPY_GBS``), or None."""
    from fuselm.planner_hardware import gpu_from_device_name

    spec = gpu_from_device_name(device_name)
    return MEASURED_COPY_GBS.get(spec.name) if spec else None


def total_params(m: ModelConfig) -> int:
    """All parameters of the model (unsharded)."""
    s = shard_shape(m, 1)
    return m.num_hidden_layers * (s.layer_matmul + s.layer_other) + s.embedding + s.lm_head \
        + s.final_norm


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage; the remainder goes to the stages before the last (as vLLM's
    ``get_pp_indices``), since the first and last stages also hold the embedding and LM head."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class StageShape:
    """What one GPU of a pipeline stage holds and reads per decode step."""

    num_layers: int
    weight_params: int
    read_params: int
    matmul_params: int
    kv_bytes_per_token: float
    first: bool
    last: bool


def stage_shapes(m: ModelConfig, tp: int, pp: int, kv_bytes: float) -> list[StageShape]:
    """Per-stage shapes of a TP x PP layout."""
    s = shard_shape(m, tp)
    out = []
    for i, n in enumerate(stage_layers(m.num_hidden_layers, pp)):
        first, last = i == 0, i == pp - 1
        layers = n * (s.layer_matmul + s.layer_other)
        # a tied LM head reads the embedding matrix, which a separate last stage must hold too
        head = s.lm_head if not m.tie_word_embeddings else (s.embedding if pp > 1 else 0)
        weights = layers + (s.embedding if first else 0) + (head + s.final_norm if last else 0)
        head_read = s.lm_head or s.embedding
        read = layers + (head_read + s.final_norm if last else 0)
        matmul = n * s.layer_matmul + (head_read if last else 0)
        kv = 2 * n * s.kv_heads_per_rank * m.head_dim * kv_bytes
        out.append(StageShape(n, weights, read, matmul, kv, first, last))
    return out


def layer_bytes(m: ModelConfig, tp: int, opts: PlanOptions) -> float:
    """Bytes of one decoder layer's parameters on one TP rank."""
    s = shard_shape(m, tp)
    return (s.layer_matmul + s.layer_other) * opts.weight_bytes


def offloaded_layers(m: ModelConfig, tp: int, num_layers: int, opts: PlanOptions) -> int:
    """Layers of a stage that ``cpu_offload_gb`` takes: whole layers until that many GiB are
    offloaded (vLLM's count; the engine's ``weight_offload.choose_offloaded``)."""
    if opts.cpu_offload_gb <= 0:
        return 0
    return min(num_layers, math.ceil(opts.cpu_offload_gb * GIB / layer_bytes(m, tp, opts)))


def offload_saved_bytes(m: ModelConfig, tp: int, stage: StageShape, opts: PlanOptions) -> float:
    """GPU memory offload frees on a GPU of ``stage``: its offloaded layers, less the two
    staging slots they stream through."""
    num = offloaded_layers(m, tp, stage.num_layers, opts)
    return (num - min(num, 2)) * layer_bytes(m, tp, opts)


def activation_bytes(m: ModelConfig, tp: int, stage: StageShape, opts: PlanOptions) -> float:
    """Peak transient memory of one forward on a GPU of ``stage`` (see module docstring)."""
    h, hd = m.hidden_size, m.head_dim
    s = shard_shape(m, tp)
    attn_live = 3 * h + (2 * s.heads_per_rank + 2 * s.kv_heads_per_rank) * hd
    mlp_live = 3 * h + 3 * math.ceil(m.intermediate_size / tp)
    live = opts.max_num_batched_tokens * max(attn_live, mlp_live) * opts.act_bytes
    logits = 2 * opts.max_num_seqs * m.vocab_size * 4 if stage.last else 0
    return live + logits


@dataclass
class LayoutPlan:
    """Per-GPU memory and predicted speed of one TP x PP layout (numbers of the binding stage)."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    num_replicas: int
    feasible: bool
    reason: str
    weight_gib: float
    activation_gib: float
    overhead_gib: float
    kv_cache_gib: float
    kv_bytes_per_token: float
    kv_capacity_tokens: int
    max_batch_at_context: int
    max_context_at_batch: int
    kv_at_batch_gib: float
    decode_latency_ms: float
    latency_breakdown_ms: dict[str, float] = field(default_factory=dict)
    peak_batch: int = 0
    peak_throughput_tok_s: float = 0.0
    peak_itl_ms: float = 0.0
    tp_crosses_nodes: bool = False
    pp_hops_across_nodes: int = 0


class _StageTimer:
    """Decode time of each stage of one layout for a micro-batch of b sequences at context c."""

    def __init__(self, m: ModelConfig, c: ClusterSpec, opts: PlanOptions, tp: int, pp: int,
                 stages: list[StageShape]) -> None:
        self.m, self.c, self.opts, self.tp, self.pp, self.stages = m, c, opts, tp, pp, stages
        self.bw = (opts.mem_bandwidth_gbs or opts.mem_bw_efficiency * c.gpu.mem_bandwidth_gbs) * GB
        self.flops = opts.flops_efficiency * c.gpu.bf16_tflops * 1e12
        self.tp_cross = c.tp_crosses_nodes(tp)
        self.hops = [c.hop_crosses_nodes(tp, i) for i in range(pp - 1)]
        self.h2d = opts.h2d_bandwidth_gbs or h2d_gbs(c.gpu)

    def _collective(self, nbytes: float, all_gather: bool = False) -> float:
        lat = self.opts.inter_node_latency_us if self.tp_cross else self.opts.allreduce_latency_us
        return collective_seconds(nbytes, self.tp, self.c.link_gbs(self.tp_cross), lat,
                                  self.opts.comm_efficiency, all_gather)

    def stage(self, s: StageShape, b: int, ctx: int) -> dict[str, float]:
        """Seconds by part; ``total`` = max(memory, compute) + comm + launches, and with
        offloaded layers max(that, copies + the tail no copy overlaps: the stage's last layer
        and head), since the copies run while the layers before each offloaded one compute."""
        parts = self._resident(s, b, ctx)
        num_off = offloaded_layers(self.m, self.tp, s.num_layers, self.opts)
        if num_off:
            link = num_off * layer_bytes(self.m, self.tp, self.opts) / (self.h2d * GB)
            tail = self._resident(self._tail(s), b, ctx)["total"]
            parts["offload"] = link
            parts["total"] = max(parts["total"], link + tail)
        return parts

    def _tail(self, s: StageShape) -> StageShape:
        """The stage cut to its last layer (and the head when it is the last stage)."""
        layer = shard_shape(self.m, self.tp)
        drop = s.num_layers - 1
        return dataclasses.replace(
            s, num_layers=1, read_params=s.read_params - drop * (layer.layer_matmul +
                                                                 layer.layer_other),
            matmul_params=s.matmul_params - drop * layer.layer_matmul,
            kv_bytes_per_token=s.kv_bytes_per_token / s.num_layers, first=False)

    def _resident(self, s: StageShape, b: int, ctx: int) -> dict[str, float]:
        o, m = self.opts, self.m
        # the first stage gathers one embedding row per sequence; layers and head read whole
        gather = embedding_gather_bytes(m, b, o.weight_bytes) if s.first else 0.0
        weights = (s.read_params * o.weight_bytes + gather) / self.bw
        kv = b * ctx * s.kv_bytes_per_token / self.bw
        heads = m.num_attention_heads // self.tp
        flops = 2 * b * s.matmul_params + 4 * b * ctx * heads * m.head_dim * s.num_layers
        compute = flops / self.flops
        act = b * m.hidden_size * o.act_bytes
        comm = 2 * s.num_layers * self._collective(act)
        comm += self._collective(act) if s.first else 0.0
        comm += self._collective(b * m.vocab_size * o.act_bytes, True) if s.last else 0.0
        launches = s.num_layers * o.kernels_per_layer * o.kernel_gap_us * 1e-6
        return {"weights": weights, "kv": kv, "compute": compute, "comm": comm,
                "launch": launches, "total": max(weights + kv, compute) + comm + launches}

    def hop(self, i: int, b: int) -> float:
        """Seconds to send b hidden states from stage i to stage i+1."""
        cross = self.hops[i]
        lat = self.opts.inter_node_latency_us if cross else self.opts.p2p_latency_us
        nbytes = b * self.m.hidden_size * self.opts.act_bytes
        return lat * 1e-6 + nbytes / (self.opts.comm_efficiency * self.c.link_gbs(cross) * GB)

    def latency(self, b: int, ctx: int) -> dict[str, float]:
        """One token's way through every stage: seconds by part and ``total``."""
        parts = {k: 0.0 for k in ("weights", "kv", "compute", "comm", "launch", "offload",
                                  "p2p", "total")}
        for s in self.stages:
            for k, v in self.stage(s, b, ctx).items():
                parts[k] += v
        parts["p2p"] = sum(self.hop(i, b) for i in range(self.pp - 1))
        parts["total"] += parts["p2p"]
        return parts

    def period(self, b: int, ctx: int) -> float:
        """Steady-state seconds between micro-batches leaving the last stage."""
        worst_hop = max((self.hop(i, b) for i in range(self.pp - 1)), default=0.0)
        return max(self.stage(s, b, ctx)["total"] for s in self.stages) + worst_hop


def decode_step_ms(m: ModelConfig, gpu: str, opts: PlanOptions, batch: int, tp: int = 1,
                   pp: int = 1) -> dict[str, float]:
    """Predicted milliseconds of one decode step of ``batch`` sequences at ``opts.context_len``
    on one TP x PP layout of ``gpu`` cards, by part (``total``: the step)."""
    cluster = ClusterSpec(get_gpu(gpu), 1, tp * pp)
    timer = _StageTimer(m, cluster, opts, tp, pp, stage_shapes(m, tp, pp, opts.kv_bytes))
    return {k: v * 1e3 for k, v in timer.latency(batch, opts.context_len).items()}


def check_layout(m: ModelConfig, tp: int, pp: int) -> str:
    """Why a layout cannot split this model, or '' if it can."""
    if m.num_attention_heads % tp:
        return f"tp={tp} does not divide {m.num_attention_heads} attention heads"
    kvh = m.num_key_value_heads
    if kvh % tp and tp % kvh:
        return f"tp={tp} and {kvh} KV heads: neither divides the other"
    if pp > m.num_hidden_layers:
        return f"pp={pp} exceeds {m.num_hidden_layers} layers"
    return ""


def plan_layout(m: ModelConfig, c: ClusterSpec, opts: PlanOptions, tp: int,
                pp: int) -> LayoutPlan:
    """Memory and predicted speed of one TP x PP layout (it must pass ``check_layout``)."""
    stages = stage_shapes(m, tp, pp, opts.kv_bytes)
    budget = opts.gpu_memory_utilization * c.gpu.memory_gib * GIB
    overhead = opts.overhead_gib * GIB
    weights = [s.weight_params * opts.weight_bytes - offload_saved_bytes(m, tp, s, opts)
               for s in stages]
    acts = [activation_bytes(m, tp, s, opts) for s in stages]
    free = [budget - w - a - overhead for w, a in zip(weights, acts, strict=True)]
    tokens = [max(0.0, f) / s.kv_bytes_per_token for f, s in zip(free, stages, strict=True)]
    binding = min(range(pp), key=lambda i: tokens[i])
    capacity = int(tokens[binding]) // opts.block_size * opts.block_size
    kv_tok = stages[binding].kv_bytes_per_token
    timer = _StageTimer(m, c, opts, tp, pp, stages)
    lat = timer.latency(1, opts.context_len)
    max_batch = capacity // opts.context_len
    peak_b = min(opts.max_num_seqs, max_batch // pp)
    replicas = c.num_gpus // (tp * pp)
    reason = ""
    if min(free) <= 0:
        reason = "weights + activations + overhead exceed the memory budget"
    elif max_batch < 1:
        reason = f"KV cache holds {capacity} tokens, fewer than context_len {opts.context_len}"
    elif peak_b < 1:
        reason = f"KV cache holds {max_batch} sequences, fewer than pp={pp} micro-batches"
    thr = replicas * peak_b / timer.period(peak_b, opts.context_len) if not reason else 0.0
    return LayoutPlan(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, num_replicas=replicas,
        feasible=not reason, reason=reason,
        weight_gib=max(weights) / GIB, activation_gib=max(acts) / GIB,
        overhead_gib=opts.overhead_gib, kv_cache_gib=max(0.0, free[binding]) / GIB,
        kv_bytes_per_token=kv_tok, kv_capacity_tokens=capacity, max_batch_at_context=max_batch,
        max_context_at_batch=capacity // opts.batch_size,
        kv_at_batch_gib=opts.batch_size * opts.context_len * kv_tok / GIB,
        decode_latency_ms=lat["total"] * 1e3,
        latency_breakdown_ms={k: v * 1e3 for k, v in lat.items()},
        peak_batch=max(0, peak_b * pp), peak_throughput_tok_s=thr,
        peak_itl_ms=timer.latency(peak_b, opts.context_len)["total"] * 1e3 if thr else 0.0,
        tp_crosses_nodes=timer.tp_cross, pp_hops_across_nodes=sum(timer.hops),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(m: ModelConfig, c: ClusterSpec) -> list[tuple[int, int]]:
    """(tp, pp) pairs with tp a power of two, tp x pp dividing the GPU count, model-splittable."""
    out = []
    tp = 1
    while tp <= c.num_gpus:
        if c.num_gpus % tp == 0:
            out += [(tp, pp) for pp in _divisors(c.num_gpus // tp) if not check_layout(m, tp, pp)]
        tp *= 2
    return out


@dataclass
class Plan:
    """Every candidate layout of a model on a cluster, and the recommended one."""

    model: str
    num_params: int
    weight_gb: float
    gpu: GPUSpec
    cluster: ClusterSpec
    options: PlanOptions
    objective: str
    layouts: list[LayoutPlan]
    recommended: LayoutPlan | None
    recommendation: str
    step_bytes_b1: float = 0.0
    """Bytes one batch-1 decode step at context_len reads on one GPU (``decode_step_bytes``)."""
    step_bytes_text: str = ""
    """The same, by part, with the bandwidth the predicted TP=1 latency implies and its fraction of
    the card's measured copy ceiling (``MEASURED_COPY_GBS``, where known)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cluster"]["num_gpus"] = self.cluster.num_gpus
        return d


def recommend(layouts: list[LayoutPlan], objective: str) -> tuple[LayoutPlan | None, str]:
    """Lowest batch-1 latency (objective ``latency``) or highest cluster throughput
    (``throughput``) among feasible layouts; near-ties (2%) go to the other metric."""
    ok = [p for p in layouts if p.feasible]
    if not ok:
        return None, "no layout fits: add GPUs, quantize the weights or shorten context_len"
    if objective == "latency":
        best = min(p.decode_latency_ms for p in ok)
        near = [p for p in ok if p.decode_latency_ms <= best * 1.02]
        pick = max(near, key=lambda p: p.peak_throughput_tok_s)
        why = f"lowest batch-1 decode latency ({pick.decode_latency_ms:.2f} ms/token)"
    elif objective == "throughput":
        best = max(p.peak_throughput_tok_s for p in ok)
        near = [p for p in ok if p.peak_throughput_tok_s >= best * 0.98]
        pick = min(near, key=lambda p: p.decode_latency_ms)
        why = f"highest peak throughput ({pick.peak_throughput_tok_s:,.0f} tok/s on the cluster)"
    else:
        raise ValueError(f"objective must be latency or throughput, not {objective!r}")
    layout = f"TP={pick.tensor_parallel_size} x PP={pick.pipeline_parallel_size}"
    return pick, f"{layout} x {pick.num_replicas} replica(s): {why}"


def make_plan(m: ModelConfig, cluster: ClusterSpec, opts: PlanOptions, *, model_name: str = "",
              objective: str = "latency",
              layouts: list[tuple[int, int]] | None = None) -> Plan:
    """Plans every candidate layout (or the given ``layouts``) and recommends one."""
    opts.validate()
    for tp, pp in layouts or []:
        why = check_layout(m, tp, pp) or ("" if tp * pp <= cluster.num_gpus else
                                          f"tp x pp = {tp * pp} > {cluster.num_gpus} GPUs")
        if why:
            raise ValueError(why)
    plans = [plan_layout(m, cluster, opts, tp, pp)
             for tp, pp in (layouts or candidate_layouts(m, cluster))]
    pick, why = recommend(plans, objective)
    n = total_params(m)
    sb = decode_step_bytes(m, 1, opts.weight_bytes, opts.context_len, opts.kv_bytes)
    tp1 = next((p for p in plans if p.tensor_parallel_size == p.pipeline_parallel_size == 1
                and p.feasible), None)
    text = sb.describe(tp1.decode_latency_ms if tp1 else None,
                       MEASURED_COPY_GBS.get(cluster.gpu.name))
    return Plan(model_name, n, n * opts.weight_bytes / GB, cluster.gpu, cluster, opts,
                objective, plans, pick, why, sb.total, text)


# ---- command line (wired by fuselm.cli as `fuselm plan`) ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm plan``: the model and cluster, then one per PlanOptions field."""
    a = parser.add_argument
    a("--model", default="Llama-3-8B",
      help="known name (Llama-3-8B/70B/405B, 30B), config.json, HF directory or .gguf")
    a("--gpu", default="H100-SXM", help=f"one of {', '.join(GPUS)}")
    a("--num-nodes", type=int, default=1)
    a("--gpus-per-node", type=int, default=8)
    a("--intra-node-bandwidth", type=float, default=None,
      help="GB/s per direction per GPU in a node (default: the GPU's NVLink spec)")
    a("--inter-node-bandwidth", type=float, default=None,
      help="GB/s per direction per GPU between nodes (default: one NDR/HDR NIC per GPU)")
    docs = field_docs(PlanOptions)
    for f in dataclasses.fields(PlanOptions):
        flag = "--" + f.name.replace("_", "-").replace("-gbs", "")
        kind = float if f.type in ("float", "float | None") else (int if f.type == "int" else str)
        a(flag, dest=f.name, type=kind, default=f.default, help=docs.get(f.name))
    a("--tensor-parallel-size", "-tp", type=int, default=None,
      help="plan only this TP (with --pipeline-parallel-size)")
    a("--pipeline-parallel-size", "-pp", type=int, default=None)
    a("--objective", choices=("latency", "throughput"), default="latency")
    a("--all", action="store_true", help="list infeasible layouts too")
    a("--output-json", default=None)


def options_from_args(args: argparse.Namespace) -> PlanOptions:
    """PlanOptions from parsed flags."""
    return PlanOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PlanOptions)})


def format_plan(plan: Plan, show_all: bool = False) -> str:
    """The plan as a text table, recommended layout marked with '*'."""
    from fuselm.tables import format_table

    o = plan.options
    head = (f"{plan.model}: {plan.num_params / 1e9:.2f}B params, {plan.weight_gb:.1f} GB"
            f" ({plan.weight_gb * GB / GIB:.1f} GiB) of weights"
            f" | {plan.cluster.num_nodes} x {plan.cluster.gpus_per_node} {plan.gpu.name}"
            f" | context {o.context_len}, KV breakdown at batch {o.batch_size}")
    rows = []
    for p in plan.layouts:
        if not (p.feasible or show_all):
            continue
        rows.append({
            "": "*" if p is plan.recommended else "",
            "TP": p.tensor_parallel_size, "PP": p.pipeline_parallel_size, "DP": p.num_replicas,
            "weights GiB": p.weight_gib, "act+ws GiB": p.activation_gib + p.overhead_gib,
            "KV GiB": p.kv_cache_gib, "KV tokens": p.kv_capacity_tokens,
            f"seqs@{o.context_len}": p.max_batch_at_context,
            f"KV@b{o.batch_size} GiB": p.kv_at_batch_gib,
            "b1 ms/tok": p.decode_latency_ms, "peak tok/s": p.peak_throughput_tok_s,
            "note": p.reason or ("TP crosses nodes" if p.tp_crosses_nodes else ""),
        })
    table = format_table(rows) if rows else "(no layout fits)"
    step = f"\nbatch-1 step, TP=1: {plan.step_bytes_text}" if plan.step_bytes_text else ""
    if o.cpu_offload_gb > 0:
        step += (f"\noffload: {o.cpu_offload_gb:g} GiB of layers a GPU streamed at "
                 f"{o.h2d_bandwidth_gbs or h2d_gbs(plan.gpu):.1f} GB/s host-to-device (in the "
                 "weights, ms/tok and tok/s columns)")
    return f"{head}\n{table}\nrecommended: {plan.recommendation}{step}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``fuselm plan``: prints the table, writes --output-json, returns the plan as a dict."""
    name, m = load_model_shape(args.model)
    cluster = ClusterSpec(get_gpu(args.gpu), args.num_nodes, args.gpus_per_node,
                          args.intra_node_bandwidth, args.inter_node_bandwidth)
    if cluster.num_gpus < 1:
        raise ValueError("the cluster needs at least one GPU")
    layouts = None
    if args.tensor_parallel_size or args.pipeline_parallel_size:
        layouts = [(args.tensor_parallel_size or 1, args.pipeline_parallel_size or 1)]
    plan = make_plan(m, cluster, options_from_args(args), model_name=name,
                     objective=args.objective, layouts=layouts)
    print(format_plan(plan, show_all=args.all or layouts is not None))
    result = plan.to_dict()
    if args.output_json:
        from fuselm.tables import write_json

        write_json(args.output_json, result)
    return result
