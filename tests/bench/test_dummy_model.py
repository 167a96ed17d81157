"""fuselm.bench.dummy_model: config-only checkpoints of the known shapes."""

from __future__ import annotations

import json

import pytest

from fuselm.bench.dummy_model import write_dummy_checkpoint
from fuselm.planner_hardware import known_model_dict


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3-70b"])
def test_llama3_shapes_are_the_planners(tmp_path, name):
    cfg = json.loads((write_dummy_checkpoint(name, tmp_path) / "config.json").read_text())
    assert cfg.items() >= known_model_dict(name).items()
    assert cfg["rope_theta"] == 500000.0 and cfg["vocab_size"] == 128256
    assert (tmp_path / "tokenizer.json").exists()


def test_overrides_and_unknown_shape(tmp_path):
    cfg = json.loads((write_dummy_checkpoint("llama-tiny", tmp_path, num_hidden_layers=2)
                      / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 256
    with pytest.raises(ValueError, match="unknown shape"):
        write_dummy_checkpoint("llama-9t", tmp_path / "x")
