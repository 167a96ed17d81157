"""Llama-family decoder: Llama 2/3 (llama3/linear rope scaling), SmolLM, Mistral, Qwen2.

Forward takes the engine's flat batch: token ids ``[num_tokens]``, positions ``[num_tokens]`` and
a ``ForwardBatch``. A pipeline stage holds layers ``[start_layer, end_layer)``; stages other than
the first take ``(hidden, residual)`` from the previous stage, stages other than the last return
it. ``compute_logits`` runs the LM head only on the rows that need logits.

Under tensor parallelism the output and down projections leave their partial sums unreduced: the
norm after each takes the all-reduce with its residual add (``RMSNorm(..., reduce=True)``, one
kernel with the custom all-reduce), so a layer hands the next one its rank's partial MLP output.

The model's ``KernelSet`` (``kernels``; default: the reference kernels) is handed to every
layer; no kernel choice is made here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fuselm.config import ModelConfig
from fuselm.forward_batch import ForwardBatch
from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers.attention import Attention, kv_scale_target
from fuselm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fuselm.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from fuselm.layers.mlp import GatedMLP
from fuselm.layers.norm import RMSNorm
from fuselm.layers.quantization import linear_method, lm_head_method
from fuselm.layers.rotary import cos_sin_cache
from fuselm.layers.weight_utils import default_weight_loader, materialize, tensor_shape
from fuselm.parallel import comm
from fuselm.parallel import parallel_state as ps

# checkpoint name part -> (our parameter name part, shard id)
_STACKED = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


class LlamaAttention(nn.Module):
    """QKV projection, rotary + paged attention, output projection."""

    def __init__(self, config: ModelConfig, rope: torch.Tensor, kernels: KernelSet,
                 sliding_window: int | None = None, prefix: str = "self_attn") -> None:
        super().__init__()
        head_size = config.head_dim
        quant = config.quantization
        qkv = linear_method(quant, kernels, tuple(f"{prefix}.{p}_proj" for p in "qkv"))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_size,
                                          config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias,
                                          kernels=kernels, method=qkv)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        self.head_size = head_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_size,
                                        config.hidden_size, bias=False, reduce_results=False,
                                        kernels=kernels,
                                        method=linear_method(quant, kernels,
                                                             (f"{prefix}.o_proj",)))
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_size,
                              head_size**-0.5, rope, kernels, sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """hidden ``[T, hidden_size]`` -> this rank's partial sum ``[T, hidden_size]``."""
        qkv = self.qkv_proj(hidden)
        num_tokens = qkv.shape[0]
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_size)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(
            num_tokens, self.num_kv_heads, self.head_size)
        v = qkv[:, self.q_size + self.kv_size :].view(
            num_tokens, self.num_kv_heads, self.head_size)
        return self.o_proj(self.attn(q, k, v, positions, batch))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with the residual carried beside the hidden state."""

    def __init__(self, config: ModelConfig, rope: torch.Tensor, kernels: KernelSet,
                 sliding_window: int | None = None, prefix: str = "layers.0") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rope, kernels, sliding_window,
                                        f"model.{prefix}.self_attn")
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias,
                            kernels, config.quantization, f"model.{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels=kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                kernels=kernels)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, batch: ForwardBatch,
                hidden_is_partial: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(this rank's partial mlp output, residual)``; the sum of the mlp output
        over the TP group plus the residual is the layer's output. ``hidden`` is the previous
        layer's partial output unless ``hidden_is_partial`` is False (the embedding, or a
        stage's input); without residual it is the embedding."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, reduce=hidden_is_partial)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual, reduce=True)
        return self.mlp(hidden), residual


def _whole(loaded: Any) -> torch.Tensor:
    """A checkpoint tensor or lazy slice read whole (a 0-dim scale too: ``[:]`` refuses it)."""
    return loaded[...] if tensor_shape(loaded) == () and not isinstance(
        loaded, torch.Tensor) else materialize(loaded)


def _effective_window(window: int | None, max_position: int) -> int | None:
    """None where a window reaches over every position the model serves (it masks nothing)."""
    return window if window is not None and window < max_position else None


def layer_range(num_layers: int, pp_rank: int, pp_size: int,
                partition: list[int] | None = None) -> tuple[int, int]:
    """Layers ``[start, end)`` of stage ``pp_rank``: an even split, or the given sizes."""
    if partition is None:
        base, extra = divmod(num_layers, pp_size)
        partition = [base + (1 if r < extra else 0) for r in range(pp_size)]
    if len(partition) != pp_size or sum(partition) != num_layers:
        raise ValueError(f"layer partition {partition} does not split {num_layers} layers "
                         f"into {pp_size} stages")
    start = sum(partition[:pp_rank])
    return start, start + partition[pp_rank]


class LlamaForCausalLM(nn.Module):
    """The whole model, or one pipeline stage of it."""

    def __init__(self, config: ModelConfig, max_position: int | None = None,
                 layer_partition: list[int] | None = None,
                 kernels: KernelSet | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelSet()
        self.config = config
        # (QuantizationConfig, checkpoint suffix, full tensor) -> {canonical suffix: tensor};
        # set by the composition root for a pre-quantized checkpoint (loading.quant_formats)
        self.quant_convert: Callable[..., dict[str, torch.Tensor]] | None = None
        self.is_first, self.is_last = ps.is_first_pp_rank(), ps.is_last_pp_rank()
        self.start_layer, self.end_layer = layer_range(
            config.num_hidden_layers, ps.get_pp_rank(), ps.get_pp_size(), layer_partition)
        max_position = max_position or config.max_position_embeddings
        rope = cos_sin_cache(config.head_dim, max_position, config.rope_theta,
                             config.rope_scaling)
        self.register_buffer("cos_sin_cache", rope, persistent=False)
        if self.is_first or (self.is_last and config.tie_word_embeddings):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       kernels=kernels)
        self.layers = nn.ModuleDict({
            str(i): LlamaDecoderLayer(config, rope, kernels,
                                      _effective_window(config.layer_window(i), max_position),
                                      f"layers.{i}")
            for i in range(self.start_layer, self.end_layer)
        })
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels=kernels)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          kernels=kernels,
                                          method=lm_head_method(config.quantization, kernels))
            if config.tie_word_embeddings:
                self.lm_head.tie_to(self.embed_tokens)

    def _apply(self, fn, recurse: bool = True):  # keeps the shared rope table in every layer
        super()._apply(fn, recurse)
        self.cos_sin_cache = self.cos_sin_cache.float()
        for layer in self.layers.values():
            layer.self_attn.attn.cos_sin_cache = self.cos_sin_cache
        return self

    def attention_layers(self) -> list[Attention]:
        """This stage's attention layers, in order (the engine binds KV caches to them)."""
        return [layer.self_attn.attn for layer in self.layers.values()]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Runs this stage: the final normed hidden ``[T, hidden]`` on the last stage,
        else ``(hidden, residual)`` for the next one."""
        if self.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate
        partial = False
        for layer in self.layers.values():
            hidden, residual = layer(positions, hidden, residual, batch, hidden_is_partial=partial)
            partial = True
        if not self.is_last:
            return (comm.tp_all_reduce(hidden) if partial else hidden), residual
        hidden, _ = self.norm(hidden, residual, reduce=partial)
        return hidden

    def compute_logits(self, hidden: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits ``[n, vocab_size]`` for hidden rows ``[n, hidden_size]`` (into
        ``out`` when given)."""
        return self.lm_head(hidden, out)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Loads (HF name, tensor) pairs into this stage's parameters; returns loaded names.
        A pre-quantized checkpoint's tensors (qweight, scales, qzeros, weight_scale, ...) are
        converted to the canonical layout of their layer's method first
        (``loading.quant_formats``)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        quantized = self._prequantized_modules()
        loaded: set[str] = set()
        for name, tensor in weights:
            if (kv_scale := kv_scale_target(name)) is not None:  # FP8 KV-cache scales
                if str(kv_scale[0]) in self.layers:
                    self.layers[str(kv_scale[0])].self_attn.attn.load_kv_scale(
                        kv_scale[1], _whole(tensor))
                continue
            target = self._target_name(name)
            if target is None:
                continue
            ours, shard = target
            module, _, suffix = ours.rpartition(".")
            pairs = [(ours, tensor)]
            if module in quantized:
                pairs = [(f"{module}.{canon}", t) for canon, t in
                         self._convert(suffix, _whole(tensor)).items()]
            for ours_name, value in pairs:
                if ours_name not in params:
                    continue
                param = params[ours_name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                if shard is None:
                    loader(param, value)
                else:
                    loader(param, value, shard)
                loaded.add(ours_name)
        return loaded

    def _convert(self, suffix: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.quant_convert is None:
            raise ValueError("a pre-quantized checkpoint loads through a tensor converter: set "
                             "model.quant_convert (engine.builder sets loading.quant_formats."
                             "convert)")
        return self.quant_convert(self.config.quantization, suffix, tensor)

    def _prequantized_modules(self) -> set[str]:
        """Names of the linear layers whose checkpoint tensors are quantized (not online)."""
        quant = self.config.quantization
        if quant is None or quant.source in ("online", "gguf"):  # gguf: packed as they come
            return set()
        return {name for name, m in self.named_modules()
                if isinstance(m, LinearBase) and not m.method.is_dense}

    def _target_name(self, name: str) -> tuple[str, Any] | None:
        if "rotary_emb.inv_freq" in name:
            return None
        name = name.removeprefix("model.")
        if name.startswith("lm_head") and self.config.tie_word_embeddings:
            return None
        if name.startswith("layers."):
            idx = int(name.split(".")[1])
            if not self.start_layer <= idx < self.end_layer:
                return None
        for ckpt, ours, shard in _STACKED:
            if f".{ckpt}." in name:
                return name.replace(ckpt, ours), shard
        return name, None

    def expected_parameters(self) -> set[str]:
        """Names of parameters a checkpoint must provide for this stage (not those with a
        default, such as a symmetric format's zero points)."""
        return {n for n, p in self.named_parameters() if not getattr(p, "optional", False)}
