"""The config dataclasses reject bad values with a ValueError naming the CLI flag (before any
weights load); the CLI turns enumerated fields into argparse choices."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from fuselm import cli
from fuselm.cli_args import add_engine_arguments, engine_config_from_args
from fuselm.config import (
    CONFIG_SECTIONS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from fuselm.errors import UnsupportedModelError

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
