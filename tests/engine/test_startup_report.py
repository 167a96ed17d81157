"""The startup report: one log line per fact, with values checked against the checkpoint read
by safetensors and the cache's size computed by hand; the CPU KV cache's automatic size."""

from __future__ import annotations

import logging
import re

import pytest
from safetensors import safe_open

from fuselm.config import CacheConfig
from fuselm.engine.kv_sizing import CPU_KV_CACHE_CAP, cpu_num_blocks
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama-linear-tied", tmp_path_factory.mktemp("tiny") / "m")


def _checkpoint_tensors(path) -> dict[str, int]:
    """Tensor name -> bytes, as the safetensors library reads the file."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name).nbytes for name in f.keys()}  # noqa: SIM118


def _lines(caplog) -> dict[str, str]:
    """Report lines by their key (the text before the first colon)."""
    return {r.getMessage().split(":", 1)[0]: r.getMessage().split(":", 1)[1].strip()
            for r in caplog.records if r.name == "fuselm.startup"}


def test_startup_lines(tiny, caplog, capfd) -> None:
    from fuselm import LLM

    caplog.set_level(logging.INFO, logger="fuselm.startup")
    max_num_seqs, max_model_len, block_size = 3, 40, 8
    llm = LLM(str(tiny), device="cpu", dtype="float32", max_num_seqs=max_num_seqs,
              max_model_len=max_model_len, block_size=block_size)
    lines = _lines(caplog)
    assert set(lines) == {"model", "format", "dtype", "device", "weights", "KV cache",
                          "max_model_len", "CUDA graphs", "startup"}
    assert lines["model"].startswith(f"{tiny.name} (LlamaForCausalLM, 2 layers, hidden 64)")
    assert lines["format"].startswith("hf safetensors")
    assert lines["dtype"] == "float32 (--dtype float32)"
    assert lines["device"] == "cpu; kernel backend: auto"
    assert lines["max_model_len"] == str(max_model_len)
    assert lines["CUDA graphs"] == "none (not used on cpu)"
    # tied head: the checkpoint may store lm_head.weight, the model holds it once
    tensors = _checkpoint_tensors(tiny)
    tensors.pop("lm_head.weight", None)
    gib = float(re.match(r"([\d.]+) GiB", lines["weights"]).group(1))
    assert gib == pytest.approx(sum(tensors.values()) / 2**30, abs=0.005)
    # blocks for 3 sequences of 40 tokens: ceil(40 / 8) = 5 blocks each
    cfg = llm.model_config
    num_blocks = 5 * max_num_seqs
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert lines["KV cache"] == (f"{num_blocks} blocks x {block_size} tokens = "
                                 f"{num_blocks * block_size} tokens, "
                                 f"{num_blocks * block_size * per_token / 2**30:.2f} GiB")
    # the weight-loading progress bar counts up to the checkpoint's number of tensors
    assert f"/{len(_checkpoint_tensors(tiny))} " in capfd.readouterr().err


@pytest.mark.parametrize("gib,seqs,model_len,want", [
    (None, 1, 8192, 512),            # one sequence of the model's context
    (None, 4, 100, 4 * 7),           # ceil(100 / 16) = 7 blocks per sequence
    (None, 256, 8192, None),         # capped at CPU_KV_CACHE_CAP
    (0.5, 256, 8192, None),          # given: half a GiB
    (1e-6, 2, 1000, 63),             # given but smaller than one sequence: one sequence
])
def test_cpu_num_blocks(gib, seqs, model_len, want) -> None:
    bytes_per_block = 16 * 46080  # SmolLM2-135M in float32: 46080 bytes a token
    cache = CacheConfig(block_size=16, cpu_kv_cache_gib=gib)
    if want is None:
        budget = CPU_KV_CACHE_CAP if gib is None else int(gib * 2**30)
        want = budget // bytes_per_block
    assert cpu_num_blocks(cache, bytes_per_block, model_len, seqs) == want


@pytest.mark.gpu
def test_cuda_graph_line(tiny, caplog) -> None:
    """On a GPU: the captured batch sizes (those of graph_batch_sizes) and the capture time."""
    from fuselm import LLM
    from fuselm.engine.model_runner import graph_batch_sizes

    caplog.set_level(logging.INFO, logger="fuselm.startup")
    LLM(str(tiny), device="cuda", max_num_seqs=8, max_model_len=64, num_gpu_blocks=64)
    line = _lines(caplog)["CUDA graphs"]
    match = re.fullmatch(r"batch sizes \[([\d, ]+)\], captured in ([\d.]+) s", line)
    assert match is not None, line
    assert [int(s) for s in match.group(1).split(",")] == sorted(graph_batch_sizes(8))
    assert float(match.group(2)) > 0
