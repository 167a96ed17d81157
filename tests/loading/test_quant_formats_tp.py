"""Pre-quantized checkpoints under tensor parallelism (2 gloo ranks on CPU): the converted
canonical tensors shard (int4 groups, scales and zero points along the input of row-parallel
layers; per-channel fp8 scales along the output of merged column-parallel ones) and give one
process's tokens and logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import dist_driver
from tests.distributed.dist_helpers import assert_same_outputs, run_driver
from tests.loading import quant_checkpoints as qc
from tests.tiny_models import make_tiny_checkpoint


@pytest.mark.parametrize("case", ["awq-g32", "ct-fp8-channel-dynamic"])
def test_tensor_parallel_matches_one_process(case: str, tmp_path: Path) -> None:
    if case.startswith("ct-"):
        pytest.importorskip("compressed_tensors")
    float_dir = make_tiny_checkpoint("llama3-gqa-scaled", tmp_path / "float")
    model = tmp_path / "quant"
    qc.write_quantized(case, float_dir, model, tmp_path / "dequant")
    want = dist_driver.run(str(model), 1, 1)
    got = run_driver(model, 2, 1)
    assert got["world_size"] == 2
    assert_same_outputs(got["outputs"], want["outputs"])
