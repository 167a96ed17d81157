"""Every bad flag value, through the real CLI in a subprocess, fails before any weight loads:
one line on stderr naming the flag, exit status 2, no traceback.

The subprocess runs ``python -m fuselm`` with the loader's two weight functions
(``load_weights``, ``init_dummy_weights``) wrapped to print a marker, so a flag checked only
after the weights loaded fails the test; the control run with good flags must show the marker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuselm.bench.dummy_model import write_dummy_checkpoint

MARKER = "WEIGHTS LOADED"

_RUN_CLI = f"""
import importlib.machinery, runpy, sys

class MarkWeights:
    '''Wraps the weight functions of fuselm.loading.loader, once imported, to print a marker.'''

    def find_spec(self, name, path=None, target=None):
        if name != "fuselm.loading.loader":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for fn in ("load_weights", "init_dummy_weights"):
                def marked(*a, _real=getattr(module, fn), **k):
                    print({MARKER!r}, file=sys.stderr, flush=True)
                    return _real(*a, **k)
                setattr(module, fn, marked)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, MarkWeights())
sys.argv = ["fuselm", *sys.argv[1:]]
runpy.run_module("fuselm", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def nine_head_model(tmp_path_factory) -> Path:
    """A checkpoint directory of 9 attention heads, 3 KV heads, 2 layers, as SmolLM2-135M's
    9 heads (config and tokenizer only: runs use --load-format dummy)."""
    return write_dummy_checkpoint(
        "llama-tiny", tmp_path_factory.mktemp("nine") / "model", num_attention_heads=9,
        num_key_value_heads=3, hidden_size=144, head_dim=16, intermediate_size=288,
        vocab_size=258, num_hidden_layers=2, max_position_embeddings=256)


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m fuselm ARGV`` with the weight marker, on the CPU, no Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", _RUN_CLI, *argv], capture_output=True,
                          text=True, timeout=120, env=env)


# (subcommand, flags, the flag the error must name); each run also gets --model (the 9-head
# model), --device cpu and --load-format dummy unless the case sets them (the last one wins).
BAD_FLAGS = [
    ("generate", ["--dtype", "fp16"], "--dtype"),
    ("generate", ["--device", "tpu"], "--device"),
    ("generate", ["--device", "cuda:"], "--device"),
    ("generate", ["--kernel-backend", "foo"], "--kernel-backend"),
    ("generate", ["--kernel-backend", "triton"], "--kernel-backend"),
    ("generate", ["--kernel-backend", "cuda"], "--kernel-backend"),
    ("chat", ["--device", "cuda:"], "--device"),
    ("generate", ["--load-format", "pt"], "--load-format"),
    ("generate", ["--load-format", "gguf"], "--load-format"),
    ("generate", ["-tp", "2"], "--tensor-parallel-size"),
    ("serve", ["-tp", "2"], "--tensor-parallel-size"),
    ("bench latency", ["-tp", "2"], "--tensor-parallel-size"),
    ("generate", ["-tp", "3", "--custom-all-reduce"], "--custom-all-reduce"),
    ("generate", ["-pp", "3"], "--pipeline-parallel-size"),
    ("generate", ["-pp", "2", "--pipeline-layer-partition", "1,2"],
     "--pipeline-layer-partition"),
    ("generate", ["--num-gpu-blocks", "2"], "--num-gpu-blocks"),
    ("generate", ["--num-gpu-blocks", "2", "--max-model-len", "64"], "--max-model-len 64"),
    ("generate", ["--max-num-seqs", "0"], "--max-num-seqs"),
    ("generate", ["--max-model-len", "abc"], "--max-model-len"),
    ("generate", ["--block-size", "12"], "--block-size"),
    ("generate", ["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    ("generate", ["--hf-overrides", "{not json"], "--hf-overrides"),
    ("generate", ["--seed", "-1"], "--seed"),
]


def _argv(command: str, flags: list[str], model: Path) -> list[str]:
    first = {"generate": ["hi", "--max-tokens", "2"], "chat": ["--max-tokens", "2"]}
    return [*command.split(), *first.get(command, []), "--model", str(model), "--device", "cpu",
            "--load-format", "dummy", *flags]


def assert_flag_error(proc: subprocess.CompletedProcess, flag: str) -> None:
    """One line on stderr that names ``flag``, status 2, no traceback, no weights loaded."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and MARKER not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "error:" in lines[0] and flag in lines[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(("command", "flags", "flag"), BAD_FLAGS,
                         ids=[f"{c}-{' '.join(f)}" for c, f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it_before_weights_load(nine_head_model, command, flags,
                                                           flag):
    assert_flag_error(run_cli(_argv(command, flags, nine_head_model)), flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")
def test_cuda_device_on_a_cpu_only_machine(nine_head_model):
    proc = run_cli(_argv("generate", ["--device", "cuda"], nine_head_model))
    assert_flag_error(proc, "--device")
    assert "no CUDA device" in proc.stderr


def test_tp_2_on_the_default_model():
    """SmolLM2-135M has 9 attention heads."""
    proc = run_cli(["generate", "hi", "--device", "cpu", "-tp", "2"])
    assert_flag_error(proc, "--tensor-parallel-size")
    assert "9 attention heads" in proc.stderr


def test_load_format_safetensors_on_a_gguf_file(default_gguf_path):
    proc = run_cli(["generate", "hi", "--model", str(default_gguf_path), "--device", "cpu",
                    "--load-format", "safetensors"])
    assert_flag_error(proc, "--load-format")
    assert "gguf" in proc.stderr


def test_control_good_flags_load_weights_and_answer(nine_head_model):
    """The same runner sees the weights load when the flags are good (the marker works)."""
    proc = run_cli(_argv("generate", ["-tp", "1", "--kernel-backend", "reference",
                                      "--load-format", "dummy"], nine_head_model))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert MARKER in proc.stderr


@pytest.mark.gpu
def test_gpus_beyond_the_visible_ones(nine_head_model):
    num_gpus = torch.cuda.device_count()
    proc = run_cli(_argv("generate", ["--device", f"cuda:{num_gpus}"], nine_head_model))
    assert_flag_error(proc, f"--device cuda:{num_gpus}")
    proc = run_cli(_argv("generate", ["--device", "cuda", "-pp", str(num_gpus + 1)],
                         nine_head_model))
    assert_flag_error(proc, "--pipeline-parallel-size")
    assert f"only {num_gpus} CUDA device" in proc.stderr
