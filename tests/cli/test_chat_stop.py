"""Stopping an answer (Ctrl-C in ``fuselm chat``) aborts its request between engine steps: every
KV block comes back and the next request on the same engine runs normally."""

from __future__ import annotations

import os
import signal

import pytest

from fuselm import cli
from fuselm.bench.dummy_model import write_dummy_checkpoint
from fuselm.config import CacheConfig, EngineConfig
from fuselm.runtime import build_engine
from fuselm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_dummy_checkpoint("llama-tiny", tmp_path_factory.mktemp("stop") / "m",
                                  vocab_size=258, num_hidden_layers=2, hidden_size=64,
                                  intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512)
    return build_engine(EngineConfig(model=str(path), load_format="dummy", device="cpu",
                                     kernel_backend="reference",
                                     cache=CacheConfig(block_size=4, num_gpu_blocks=128)))


def test_stopped_answer_frees_its_blocks_and_the_next_one_runs(engine, capsys):
    bm = engine.block_manager
    steps = iter(range(1000))
    stop_after = 6  # the prompt's prefill, then a few decode steps
    answer = cli._stream(engine, "a", "the prompt", SamplingParams(
        max_tokens=400, ignore_eos=True), stop=lambda: next(steps) >= stop_after)
    assert answer.stopped and 0 < answer.num_tokens < 400
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks
    assert capsys.readouterr().out.endswith(" [stopped]\n")
    after = cli._stream(engine, "b", "the prompt", SamplingParams(max_tokens=5, ignore_eos=True))
    assert not after.stopped and after.num_tokens == 5
    assert bm.num_free_blocks == bm.num_blocks


def test_stop_flag_turns_sigint_into_a_flag_and_restores_the_handler():
    # Python's own handler, whatever the runner inherited (a job started in the background by
    # a non-interactive shell has SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        flag = cli._StopFlag()
        with flag:
            assert not flag()
            os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt outside
            assert flag()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
