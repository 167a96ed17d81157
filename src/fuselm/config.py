"""Frozen configuration dataclasses: model, cache, scheduler, parallelism, engine.

The engine's sections validate themselves in ``__post_init__`` (ValueError naming the CLI flag),
so a bad value fails before any weight loads. Enumerated fields are ``Literal`` types; the CLI
(``cli_args``) turns them into argparse ``choices``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from fuselm.errors import ConfigError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}
"""Hugging Face architecture name -> fuselm model family (the one list of what fuselm runs)."""

DType = Literal["auto", "float32", "float16", "bfloat16", "float", "half"]
DTYPE_ALIASES = {"float": "float32", "half": "float16"}
"""Other names of dtypes (vLLM's), accepted by ``--dtype``."""
KernelBackend = Literal["auto", "reference", "triton", "cuda"]
LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]
Quantization = Literal["fp8", "int8", "int4", "gguf"]
QuantizationCalibration = Literal["gptq"]
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3"]
MAX_BLOCK_SIZE = 256
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, value: Any, requirement: str) -> None:
    """Raises ConfigError (a ValueError) naming the flag of field `name` unless `ok`."""
    if not ok:
        raise ConfigError(f"{_flag(name)} must be {requirement}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    _check(is_int and value >= minimum, name, value, f"an integer >= {minimum}"
           + (" (or unset)" if optional else ""))


def _check_choices(obj: Any) -> None:
    """Checks every ``Literal`` field of the dataclass `obj` against its choices."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        choices = literal_choices(hint)
        value = getattr(obj, name)
        if value is None and type(None) in typing.get_args(hint):
            continue
        if choices and value not in choices:
            _check(False, name, getattr(obj, name), f"one of {', '.join(choices)}")


def literal_choices(hint: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type (also inside ``X | None``); () for other types."""
    if typing.get_origin(hint) is Literal:
        return tuple(typing.get_args(hint))
    for arg in typing.get_args(hint):
        if typing.get_origin(arg) is Literal:
            return tuple(typing.get_args(arg))
    return ()


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, read from a Hugging Face config dict."""

    architecture: str
    """Hugging Face architecture name, e.g. ``LlamaForCausalLM``."""
    vocab_size: int
    """Number of token ids."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the MLP's gate/up projections."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (GQA when fewer than query heads)."""
    head_dim: int
    """Size of one attention head."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary base."""
    rope_scaling: dict[str, Any] | None = None
    """Rotary scaling (types ``llama3``, ``linear``, or None)."""
    max_position_embeddings: int = 2048
    """Longest context the model was trained for."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    attention_bias: bool = False
    """QKV projections carry a bias (Qwen2)."""
    mlp_bias: bool = False
    """Gate, up and down projections carry a bias (Llama's ``mlp_bias``)."""
    sliding_window: int | None = None
    """Tokens a query attends to, itself included (Mistral, Qwen2); None: the whole context."""
    layer_types: tuple[str, ...] | None = None
    """Per layer ``sliding_attention`` or ``full_attention``; None: every layer slides when
    ``sliding_window`` is set."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token."""
    eos_token_id: tuple[int, ...] = ()
    """End-of-sequence token(s)."""
    quantization_config: dict[str, Any] | None = None
    """The checkpoint's ``quantization_config`` as read (None: a float checkpoint)."""
    quantization: Any = None
    """The ``layers.quantization.QuantizationConfig`` the layers run: the checkpoint's (parsed,
    an unknown method refused by name) or the online one of ``--quantization``, set by
    ``engine.builder.with_quantization``; None: float weights."""

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Builds the config from a config.json dict; raises UnsupportedModelError if unknown."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; fuselm runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        params = cfg.get("rope_parameters")
        if isinstance(params, dict):  # transformers >= 5 keeps rope settings here
            rope_theta = rope_theta or params.get("rope_theta")
            if rope_scaling is None and params.get("rope_type", "default") != "default":
                rope_scaling = dict(params)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling["rope_type"] = rtype
            if rtype == "default":
                rope_scaling = None
            elif rtype not in ("llama3", "linear"):
                raise UnsupportedModelError(
                    f"unsupported rope_scaling type {rtype!r}; fuselm supports llama3 and linear"
                )
        quant = cfg.get("quantization_config")  # parsed (or refused) by engine.builder
        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act != "silu":
            raise UnsupportedModelError(
                f"unsupported hidden_act {act!r} in the model config; fuselm's gated MLP "
                "implements silu")
        sliding_window, layer_types = _sliding_window(cfg, arch, int(cfg["num_hidden_layers"]))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", is_qwen2)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_ids,
            quantization_config=quant or None,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer``, or None (full attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_window(cfg: dict[str, Any], arch: str,
                    num_layers: int) -> tuple[int | None, tuple[str, ...] | None]:
    """``(sliding_window, layer_types)`` as transformers reads them: Mistral slides in every
    layer when ``sliding_window`` is set; Qwen2 only with ``use_sliding_window``, in the layers
    from ``max_window_layers`` on (or as ``layer_types`` says)."""
    window = cfg.get("sliding_window")
    if arch == "LlamaForCausalLM" or (arch == "Qwen2ForCausalLM"
                                      and not cfg.get("use_sliding_window", False)):
        window = None  # what transformers reads for these architectures
    layer_types = cfg.get("layer_types")
    if window is None:
        if layer_types and "sliding_attention" in layer_types:
            raise UnsupportedModelError("layer_types has sliding_attention layers but the "
                                        "config sets no sliding_window")
        return None, None
    if int(window) < 1:
        raise UnsupportedModelError(f"sliding_window must be >= 1, got {window}")
    if layer_types is None and arch == "Qwen2ForCausalLM":
        first = int(cfg.get("max_window_layers", num_layers))
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    if layer_types is not None:
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown or len(layer_types) != num_layers:
            raise UnsupportedModelError(
                f"unsupported layer_types {unknown or layer_types!r}: fuselm runs "
                f"{', '.join(LAYER_TYPES)}, one per layer ({num_layers})")
        layer_types = tuple(layer_types)
    return int(window), layer_types


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory fuselm may use (weights, activations, KV cache)."""
    num_gpu_blocks: int | None = None
    """Fixed number of KV blocks; None sizes the cache from free memory (on CPU: from
    cpu_kv_cache_gib)."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks across requests that share a token prefix."""
    cpu_kv_cache_gib: float | None = None
    """KV cache size on CPU when num_gpu_blocks is not given; None sizes it for max_num_seqs
    sequences of max_model_len tokens, at most 1 GiB (and one whole sequence at least)."""
    kv_cache_dtype: KVCacheDType = "auto"
    """auto (the model's dtype) or fp8 / fp8_e4m3 (e4m3 with per-layer scales: about twice
    the tokens per GiB)."""
    swap_space: float = 0.0
    """GiB of pinned CPU memory per GPU that preempted requests' KV blocks are swapped to
    (instead of being recomputed); 0 always recomputes."""
    kv_offloading_size: float = 0.0
    """GiB of pinned CPU memory for a second prefix-cache tier: full KV blocks evicted from
    the GPU are kept there and copied back on a prefix hit; 0 disables it."""

    def __post_init__(self) -> None:
        bs = self.block_size
        _check_int("block_size", bs, 1)
        _check(bs <= MAX_BLOCK_SIZE and bs & (bs - 1) == 0, "block_size", bs,
               f"a power of 2 from 1 to {MAX_BLOCK_SIZE}")
        util = self.gpu_memory_utilization
        _check(isinstance(util, int | float) and 0 < util <= 1, "gpu_memory_utilization", util,
               "in (0, 1]")
        _check_int("num_gpu_blocks", self.num_gpu_blocks, 1, optional=True)
        gib = self.cpu_kv_cache_gib
        _check(gib is None or (isinstance(gib, int | float) and gib > 0), "cpu_kv_cache_gib",
               gib, "> 0 (or unset)")
        _check_choices(self)
        for name in ("swap_space", "kv_offloading_size"):
            value = getattr(self, name)
            _check(isinstance(value, int | float) and not isinstance(value, bool)
                   and value >= 0, name, value, ">= 0 GiB")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits per engine step."""

    max_num_seqs: int = 256
    """Most sequences in one step."""
    max_num_batched_tokens: int = 8192
    """Most tokens (prefill + decode) in one step."""
    max_model_len: int | None = None
    """Longest prompt + output; None takes the model's max_position_embeddings."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so that decodes never stall."""
    max_waiting_requests: int | None = None
    """Bound of the waiting queue (the server answers 429 beyond it); None is unbounded."""

    def __post_init__(self) -> None:
        # vLLM also requires max_num_batched_tokens >= max_num_seqs; fuselm does not: with
        # chunked prefill a small token budget only makes steps smaller, and the builder checks
        # max_num_batched_tokens >= max_model_len when chunked prefill is off.
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_model_len", self.max_model_len, 1, optional=True)
        _check_int("max_waiting_requests", self.max_waiting_requests, 1, optional=True)


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor and pipeline parallelism."""

    tensor_parallel_size: int = 1
    """Ranks a layer is split over."""
    pipeline_parallel_size: int = 1
    """Stages the layers are split into."""
    distributed_timeout: float = 60.0
    """Seconds before a stalled collective counts as a failure."""
    pipeline_layer_partition: str | None = None
    """Layers per pipeline stage, comma-separated (e.g. 18,14); None splits evenly."""
    custom_all_reduce: bool | None = None
    """fuselm's one-shot all-reduce (over peer-mapped memory, fused with the residual add +
    RMSNorm that follows) for decode-sized tensor-parallel messages instead of NCCL; None: on
    wherever it can work (CUDA, the TP ranks on one host); False: NCCL only."""

    def __post_init__(self) -> None:
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("pipeline_parallel_size", self.pipeline_parallel_size, 1)
        timeout = self.distributed_timeout
        _check(isinstance(timeout, int | float) and timeout > 0, "distributed_timeout", timeout,
               "> 0 seconds")
        partition = self.pipeline_layer_partition
        if partition is not None:
            parts = partition.split(",") if isinstance(partition, str) else []
            ok = (len(parts) == self.pipeline_parallel_size
                  and all(p.strip().isdigit() and int(p) >= 1 for p in parts))
            _check(ok, "pipeline_layer_partition", partition,
                   f"{self.pipeline_parallel_size} positive layer counts, comma-separated "
                   "(one per pipeline stage)")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start."""

    model: str | None = None
    """Hugging Face directory, .gguf file or Hub id ORG/NAME; None is the default model."""
    revision: str | None = None
    """Branch, tag or commit of a Hub id (--model ORG/NAME); None is main."""
    download_dir: str | None = None
    """Cache folder of Hub downloads; None is huggingface_hub's ($HF_HOME/hub)."""
    tokenizer: str | None = None
    """Tokenizer folder, .gguf file or Hub id; None is the model's own."""
    dtype: DType = "auto"
    """auto (bf16 on GPU, float32 on CPU), float32, float16, bfloat16 (float and half are
    aliases)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    kernel_backend: KernelBackend = "auto"
    """auto (the fastest that runs on the device), reference (plain PyTorch), triton, cuda."""
    enforce_eager: bool = False
    """Disable CUDA graphs."""
    async_scheduling: bool | None = None
    """Queue the next decode step before reading the current one's tokens (overlaps host work
    with the GPU; single process only). Unset: on for CUDA devices, off on CPU."""
    seed: int = 0
    """Seed of the default random generator."""
    quantization: Quantization | None = None
    """Quantize a float checkpoint's linear layers at load: fp8 (W8A8 e4m3, per-channel
    weight scales, per-token dynamic activation scales), int8 (weight-only, per channel) or
    int4 (weight-only, groups of 128 with zero points); gguf keeps a .gguf model's blocks
    packed and multiplies them in place; None keeps the checkpoint's own format (a
    pre-quantized checkpoint is detected from its quantization_config; a .gguf model is
    dequantized at load)."""
    quantization_calibration: QuantizationCalibration | None = None
    """gptq: with --quantization fp8, round each weight by GPTQ against its inputs' second
    moments, collected while the float model samples 32 texts of 256 tokens of its own (no
    data set; adds that sampling and the rounding to the load); None: round to nearest."""
    cpu_offload_gb: float = 0.0
    """GB of the weights kept in pinned CPU memory and copied to the GPU just before use
    (for models larger than the GPU); 0 keeps every weight on the device."""
    load_format: LoadFormat = "auto"
    """auto (whatever the checkpoint is), safetensors (a Hugging Face directory), gguf (a .gguf
    file), or dummy (random weights, for benchmarks); safetensors and gguf must match the
    checkpoint."""
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """Config dict entries to override."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(isinstance(self.device, str) and _DEVICE.fullmatch(self.device) is not None,
               "device", self.device, "auto, cpu, cuda or cuda:N")
        _check_int("seed", self.seed, 0)
        for name in ("revision", "download_dir", "tokenizer"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value != ""), name, value,
                   "a non-empty string (or unset)")
        _check(isinstance(self.hf_overrides, dict), "hf_overrides", self.hf_overrides,
               "a JSON object")
        offload = self.cpu_offload_gb
        _check(isinstance(offload, int | float) and not isinstance(offload, bool)
               and offload >= 0, "cpu_offload_gb", offload, ">= 0 GB")
        _check(self.quantization_calibration is None or self.quantization == "fp8",
               "quantization_calibration", self.quantization_calibration,
               "unset unless --quantization fp8 (gptq is implemented for fp8 only)")
        for name, cls in CONFIG_SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"EngineConfig.{name} must be a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")


CONFIG_SECTIONS: dict[str, type] = {
    "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig}
"""EngineConfig's nested sections by field name (the CLI and ``LLM(**kwargs)`` read flat names)."""


_LOAD_FORMAT_OF_SOURCE = {"hf": "safetensors", "gguf": "gguf"}


def check_load_format(load_format: str, source_format: str, model: str) -> None:
    """Raises ConfigError when ``--load-format`` names another format than the checkpoint's
    (``source_format``: "hf" or "gguf"); auto and dummy accept either."""
    found = _LOAD_FORMAT_OF_SOURCE.get(source_format, source_format)
    if load_format not in ("auto", "dummy") and load_format != found:
        raise ConfigError(f"--load-format {load_format} does not match the checkpoint {model}, "
                          f"which is {found}; pass --load-format auto or {found}")


def _parallel_misfit(model: ModelConfig, tp: int) -> str:
    """Why ``tp`` ranks cannot split the model's layers, or '' if they can."""
    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    if heads % tp:
        return f"does not divide the model's {heads} attention heads"
    if kv_heads % tp and tp % kv_heads:  # KV heads are replicated when tp exceeds them
        return f"and the model's {kv_heads} KV heads do not divide one another"
    if model.intermediate_size % tp:
        return f"does not divide the model's MLP width {model.intermediate_size}"
    return ""


def check_implemented(config: EngineConfig) -> None:
    """Raises ConfigError naming a flag whose feature this build does not run yet (accepted
    by the parser so that its value is validated, refused before anything loads)."""
    parallel = config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size > 1
    if parallel and config.quantization_calibration is not None:
        raise ConfigError("--quantization-calibration is not implemented with tensor or "
                          "pipeline parallelism yet (one process only)")
    for name in ("swap_space", "kv_offloading_size"):  # the step plan carries no block moves
        if parallel and getattr(config.cache, name) > 0:
            raise ConfigError(f"{_flag(name)} is not implemented with tensor or pipeline "
                              "parallelism yet (one process only)")


def check_parallel_fits(config: EngineConfig, model: ModelConfig) -> None:
    """Raises ConfigError naming the flag when tensor x pipeline parallelism cannot split
    ``model`` (read from its config, before any weight loads)."""
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    if why := _parallel_misfit(model, tp):
        fits = [n for n in range(1, model.num_attention_heads + 1)
                if not _parallel_misfit(model, n)]
        raise ConfigError(f"--tensor-parallel-size {tp} {why}; sizes that fit: "
                          f"{', '.join(map(str, fits))}")
    layers = model.num_hidden_layers
    if pp > layers:
        raise ConfigError(f"--pipeline-parallel-size {pp} exceeds the model's {layers} layers")
    partition = config.parallel.pipeline_layer_partition
    if partition is not None:
        parts = [int(p) for p in partition.split(",")]
        if sum(parts) != layers or len(parts) != pp or min(parts) < 1:
            raise ConfigError(f"--pipeline-layer-partition {partition} must sum to the model's "
                              f"{layers} layers in {pp} positive stage sizes")


def check_cache_fits(config: EngineConfig, model: ModelConfig) -> None:
    """Raises ConfigError when a fixed ``--num-gpu-blocks`` cannot hold one sequence of
    max_model_len tokens (the engine needs that much for its longest request)."""
    blocks, block_size = config.cache.num_gpu_blocks, config.cache.block_size
    max_len = config.scheduler.max_model_len or model.max_position_embeddings
    if blocks is not None and blocks * block_size < max_len:
        limit = (f"--max-model-len {max_len}" if config.scheduler.max_model_len else
                 f"max_model_len {max_len} (the model's context; lower it with --max-model-len)")
        raise ConfigError(f"--num-gpu-blocks {blocks} x --block-size {block_size} holds "
                          f"{blocks * block_size} tokens, fewer than {limit}")
