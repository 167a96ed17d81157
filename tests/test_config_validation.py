"""The config dataclasses reject bad values with a ValueError naming the CLI flag (before any
weights load); the CLI turns enumerated fields into argparse choices."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest
import torch

from fuselm import cli
from fuselm.cli_args import add_engine_arguments, engine_config_from_args
from fuselm.config import (
    CONFIG_SECTIONS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    check_cache_fits,
    check_load_format,
    check_parallel_fits,
)
from fuselm.errors import ConfigError, UnsupportedModelError
from fuselm.runtime import check_device

BAD = [
    (CacheConfig, {"block_size": 0}, "--block-size"),
    (CacheConfig, {"block_size": 12}, "--block-size"),
    (CacheConfig, {"block_size": 512}, "--block-size"),
    (CacheConfig, {"gpu_memory_utilization": 0.0}, "--gpu-memory-utilization"),
    (CacheConfig, {"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization"),
    (CacheConfig, {"num_gpu_blocks": 0}, "--num-gpu-blocks"),
    (CacheConfig, {"cpu_kv_cache_gib": 0}, "--cpu-kv-cache-gib"),
    (SchedulerConfig, {"max_num_seqs": 0}, "--max-num-seqs"),
    (SchedulerConfig, {"max_num_seqs": 2.5}, "--max-num-seqs"),
    (SchedulerConfig, {"max_num_batched_tokens": 0}, "--max-num-batched-tokens"),
    (SchedulerConfig, {"max_model_len": 0}, "--max-model-len"),
    (SchedulerConfig, {"max_waiting_requests": 0}, "--max-waiting-requests"),
    (ParallelConfig, {"tensor_parallel_size": 0}, "--tensor-parallel-size"),
    (ParallelConfig, {"pipeline_parallel_size": -1}, "--pipeline-parallel-size"),
    (ParallelConfig, {"distributed_timeout": 0}, "--distributed-timeout"),
    (ParallelConfig, {"pipeline_parallel_size": 2, "pipeline_layer_partition": "3"},
     "--pipeline-layer-partition"),
    (ParallelConfig, {"pipeline_parallel_size": 2, "pipeline_layer_partition": "3,x"},
     "--pipeline-layer-partition"),
    (EngineConfig, {"dtype": "int8"}, "--dtype"),
    (EngineConfig, {"device": "tpu"}, "--device"),
    (EngineConfig, {"device": "cuda:"}, "--device"),
    (EngineConfig, {"kernel_backend": "cutlass"}, "--kernel-backend"),
    (EngineConfig, {"load_format": "pickle"}, "--load-format"),
    (EngineConfig, {"seed": -1}, "--seed"),
]


@pytest.mark.parametrize(("cls", "kwargs", "flag"), BAD,
                         ids=[f"{c.__name__}-{k}" for c, k, _ in BAD])
def test_bad_value_names_its_flag(cls, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        cls(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"block_size": 1}, {"block_size": 256}, {"gpu_memory_utilization": 1.0},
    {"max_num_seqs": 1, "max_num_batched_tokens": 1}, {"max_model_len": 1},
    {"device": "cuda:1", "dtype": "bfloat16", "kernel_backend": "triton"},
    {"pipeline_parallel_size": 2, "pipeline_layer_partition": "18,14"},
])
def test_good_values_pass(kwargs):
    sections = {name: cls(**{k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__})
                for name, cls in CONFIG_SECTIONS.items()}
    top = {k: v for k, v in kwargs.items() if k in EngineConfig.__dataclass_fields__}
    EngineConfig(**top, **sections)


def test_sections_must_have_their_type():
    with pytest.raises(TypeError, match="cache"):
        EngineConfig(cache=SchedulerConfig())  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm")
    add_engine_arguments(parser)
    return parser


@pytest.mark.parametrize("argv", [["--dtype", "int8"], ["--kernel-backend", "cutlass"],
                                  ["--load-format", "pickle"]])
def test_parser_rejects_a_bad_choice(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert "invalid choice" in err.getvalue() and argv[0] in err.getvalue()


def test_cli_rejects_a_bad_value_before_loading(capsys):
    assert cli.main(["generate", "hi", "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs must be an integer >= 1, got 0" in capsys.readouterr().err


def test_flags_round_trip_and_help():
    args = _parser().parse_args(["--dtype", "float16", "--block-size", "32",
                                 "--no-enable-prefix-caching", "--seed", "3"])
    config = engine_config_from_args(args)
    assert (config.dtype, config.cache.block_size, config.seed) == ("float16", 32, 3)
    assert config.cache.enable_prefix_caching is False and config.async_scheduling is None
    text = " ".join(_parser().format_help().split())
    assert "--dtype {auto,float32,float16,bfloat16}" in text
    assert "--kernel-backend {auto,reference,triton,cuda}" in text
    assert "ENGINE." not in text and "CACHE." not in text and "``" not in text
    assert "default: None" not in text and "None" not in text
    assert "off on CPU. --seed SEED" in text  # a tri-state flag shows no default
    assert "--block-size BLOCK_SIZE Tokens per KV block. (default: 16)" in text


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"]})


def _model(heads: int = 9, kv_heads: int = 3, intermediate: int = 1536,
           layers: int = 30) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", vocab_size=100, hidden_size=heads * 64,
                       intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64)


def _parallel(tp: int = 1, pp: int = 1, partition: str | None = None) -> EngineConfig:
    return EngineConfig(parallel=ParallelConfig(tensor_parallel_size=tp,
                                                pipeline_parallel_size=pp,
                                                pipeline_layer_partition=partition))


@pytest.mark.parametrize(("model", "tp", "pp", "partition", "flag"), [
    (_model(), 2, 1, None, "--tensor-parallel-size 2 does not divide the model's 9 attention"),
    (_model(heads=12, kv_heads=8), 3, 1, None, "8 KV heads do not divide"),
    (_model(heads=8, kv_heads=8, intermediate=100), 8, 1, None, "MLP width 100"),
    (_model(layers=2), 1, 3, None, "--pipeline-parallel-size 3 exceeds the model's 2 layers"),
    (_model(layers=30), 1, 2, "10,10", "--pipeline-layer-partition 10,10 must sum to"),
])
def test_parallel_sizes_that_do_not_split_the_model(model, tp, pp, partition, flag):
    with pytest.raises(ConfigError, match=flag):
        check_parallel_fits(_parallel(tp, pp, partition), model)


@pytest.mark.parametrize(("model", "tp", "pp", "partition"), [
    (_model(), 3, 1, None),
    (_model(intermediate=1152), 9, 1, None),  # 9 ranks: each KV head on 3 of them
    (_model(heads=32, kv_heads=8, intermediate=14336), 8, 2, "18,14"),
])
def test_parallel_sizes_that_split_the_model(model, tp, pp, partition):
    if partition:
        model = model.replace(num_hidden_layers=32)
    check_parallel_fits(_parallel(tp, pp, partition), model)


def test_fitting_sizes_are_listed():
    """SmolLM2-135M's shape: 9 heads, 3 KV heads, MLP 1536 (not a multiple of 9)."""
    with pytest.raises(ConfigError, match="sizes that fit: 1, 3$"):
        check_parallel_fits(_parallel(2), _model())


@pytest.mark.parametrize(("load_format", "source", "ok"), [
    ("auto", "hf", True), ("auto", "gguf", True), ("dummy", "gguf", True),
    ("safetensors", "hf", True), ("gguf", "gguf", True),
    ("safetensors", "gguf", False), ("gguf", "hf", False)])
def test_load_format_against_the_checkpoint(load_format, source, ok):
    if ok:
        check_load_format(load_format, source, "m")
    else:
        with pytest.raises(ConfigError, match=f"--load-format {load_format} does not match"):
            check_load_format(load_format, source, "m")


@pytest.fixture
def one_gpu(monkeypatch):
    """This process sees one CUDA device (without touching one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "cuda:1"}, "--device cuda:1: only 1 CUDA device"),
    ({"parallel": ParallelConfig(tensor_parallel_size=2)}, "is 2, but only 1 CUDA device"),
])
def test_devices_that_are_not_there(one_gpu, monkeypatch, kwargs, message):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=message):
        check_device(EngineConfig(**kwargs))


def test_backends_a_gpu_runs(one_gpu):
    for backend in ("auto", "reference", "triton", "cuda"):
        check_device(EngineConfig(device="cuda", kernel_backend=backend))
    check_device(EngineConfig(device="cpu", kernel_backend="reference"))


def test_triton_on_the_cpu_only_under_its_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_device(EngineConfig(device="cpu", kernel_backend="triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="--kernel-backend triton needs a CUDA device"):
        check_device(EngineConfig(device="cpu", kernel_backend="triton"))
    with pytest.raises(ConfigError, match="--kernel-backend cuda needs a CUDA device"):
        check_device(EngineConfig(device="auto", kernel_backend="cuda"))


@pytest.mark.parametrize(("blocks", "block_size", "max_model_len", "ok"), [
    (None, 16, None, True), (192, 16, None, True), (191, 16, None, False),
    (4, 16, 64, True), (3, 16, 64, False), (64, 1, 64, True)])
def test_a_fixed_kv_cache_holds_one_whole_sequence(blocks, block_size, max_model_len, ok):
    config = EngineConfig(cache=CacheConfig(num_gpu_blocks=blocks, block_size=block_size),
                          scheduler=SchedulerConfig(max_model_len=max_model_len))
    model = _model().replace(max_position_embeddings=3072)  # 192 blocks of 16
    if ok:
        check_cache_fits(config, model)
    else:
        with pytest.raises(ConfigError, match=f"--num-gpu-blocks {blocks} x --block-size"):
            check_cache_fits(config, model)


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"cache": CacheConfig(swap_space=1)}, "--swap-space"),
    ({"cache": CacheConfig(kv_offloading_size=1)}, "--kv-offloading-size"),
])
def test_accepted_flag_not_yet_run_is_refused_by_name(kwargs, flag):
    """A flag the parser accepts but this build does not run with several ranks is refused
    there by name, never ignored."""
    kwargs = {**kwargs, "parallel": ParallelConfig(tensor_parallel_size=2)}
    from fuselm.config import check_implemented

    with pytest.raises(ValueError, match=flag):
        check_implemented(EngineConfig(**kwargs))
