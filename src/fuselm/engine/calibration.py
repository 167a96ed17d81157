"""``--quantization-calibration gptq``: GPTQ-rounded fp8 weights from the model's own samples.

``gptq_fp8_weights(config)`` builds the float engine of ``config`` (no quantization), lets it
sample ``SAMPLES`` texts of ``SAMPLE_TOKENS`` tokens from the BOS token (temperature 1, seeds
0..SAMPLES-1: no calibration data set is needed, and none can overlap a user's evaluation text),
accumulates for every linear layer but the LM head ``H = E[x x^T]`` of its inputs over every
prefill and decode token (the float engine runs eager, so that every step reaches the hooks),
rounds each float weight with
``layers.quantization.gptq.gptq_fp8_per_channel`` and shuts that engine down.
``apply_fp8_weights(model, weights)`` then writes them over the online fp8 layers of the
quantized model (in place: CUDA graphs keep their pointers).

One process only (tensor and pipeline parallelism are refused by ``config.check_implemented``);
the float engine and the quantized one are never loaded at the same time. The float engine's
KV cache holds the samples only; every layer's H is held at once in float32 (K^2 a linear
layer: about 32 GB for Llama-3-8B, on its device).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time

import torch
from torch import nn

from fuselm.config import EngineConfig

logger = logging.getLogger(__name__)

SAMPLES = 32
SAMPLE_TOKENS = 256


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    from fuselm.layers.linear import LinearBase

    return {name: m for name, m in model.named_modules()
            if isinstance(m, LinearBase) and not name.endswith("lm_head")}


def _sample(engine) -> None:
    """Lets ``engine`` sample ``SAMPLES`` texts from its BOS token (the hooks see them)."""
    from fuselm.sampling_params import SamplingParams

    bos = engine.tokenizer.bos_token_id
    tokens = min(SAMPLE_TOKENS, engine.max_model_len - 1)  # after the BOS
    for i in range(SAMPLES):
        params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=i,
                                detokenize=False)
        engine.add_request(f"gptq-calibration-{i}", [bos if bos is not None else 0], params)
    while engine.has_unfinished_requests():
        engine.step(stream=False)


def gptq_fp8_weights(config: EngineConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (weight e4m3fn, weight_scale float32)}``, GPTQ-rounded against the
    float model's inputs while it samples its own calibration texts (module docstring)."""
    from fuselm.engine.builder import build_engine_parts
    from fuselm.engine.engine import LLMEngine
    from fuselm.engine.executor import LocalExecutor
    from fuselm.layers.quantization.gptq import gptq_fp8_per_channel
    from fuselm.loading import loader

    start = time.perf_counter()
    # eager: a replayed CUDA graph runs no forward hook, and a capture would feed them dummies
    float_config = dataclasses.replace(config, quantization=None, quantization_calibration=None,
                                       enforce_eager=True)
    source, model_config = loader.load_model_config(float_config)
    # a KV cache for the samples only: the Hessians need the memory a full cache would take
    max_len = min(config.scheduler.max_model_len or model_config.max_position_embeddings,
                  SAMPLE_TOKENS + 1)
    per_seq = -(-max_len // config.cache.block_size)
    # all samples in one batch, whatever the serving limit (``fuselm generate`` runs one)
    scheduler = dataclasses.replace(config.scheduler, max_model_len=max_len,
                                    max_num_seqs=SAMPLES,
                                    max_num_batched_tokens=max(
                                        SAMPLES, config.scheduler.max_num_batched_tokens))
    float_config = dataclasses.replace(
        float_config, scheduler=scheduler,
        cache=dataclasses.replace(config.cache, num_gpu_blocks=SAMPLES * per_seq + 1))
    parts = build_engine_parts(float_config, source, model_config)
    engine = LLMEngine(float_config, parts, LocalExecutor(parts.runner))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def accumulate(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _out) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                counts[name] = 0
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return accumulate

    try:
        layers = _linear_layers(engine.runner.model)
        handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
        try:
            _sample(engine)
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(set(layers) - set(sums))
        if missing:
            raise RuntimeError(f"--quantization-calibration gptq: no inputs reached "
                               f"{missing[:3]}")
        sampled = time.perf_counter() - start
        weights = {name: gptq_fp8_per_channel(layer.weight.data, sums.pop(name) / counts[name])
                   for name, layer in layers.items()}
    finally:
        engine.shutdown()
        del engine, parts
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logger.info("gptq calibration: %d layers, %d tokens each, sampled in %.1f s, rounded in "
                "%.1f s", len(weights), min(counts.values()), sampled,
                time.perf_counter() - start - sampled)
    return weights


def apply_fp8_weights(model: nn.Module,
                      weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Writes ``weights`` over every online fp8 layer of ``model`` (in place: the parameters
    keep their storage); a layer without an entry is an error."""
    from fuselm.layers.quantization.fp8 import Fp8LinearMethod

    for name, layer in _linear_layers(model).items():
        method = layer.method
        if not isinstance(method, Fp8LinearMethod) or not method.online:
            continue
        if name not in weights:
            raise RuntimeError(f"--quantization-calibration gptq: no calibration for {name}")
        q, scale = weights[name]
        if q.shape != layer.weight.shape or scale.shape != layer.weight_scale.shape:
            raise RuntimeError(f"--quantization-calibration gptq: {name} is "
                               f"{tuple(layer.weight.shape)}, its calibration {tuple(q.shape)}")
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
