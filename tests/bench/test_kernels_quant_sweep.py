"""The weight-only matmul sweep of ``bench kernels_quant``: every config it times can run the 8B
shapes (the configs the op refuses are left out, not reported as failures), labels are unique
(they key the timings), and split K is swept only at M <= 64."""

from __future__ import annotations

import pytest
import torch

from fuselm.bench import kernels_quant as kq
from fuselm.kernels import int4_matmul as i4
from fuselm.kernels import int8_matmul as i8


class _Case(kq.Case):
    """A Case without weights (``configs`` reads only kind, shape and the device)."""

    def __init__(self, kind: str, n: int, k: int) -> None:
        self.kind, self.n, self.k = kind, n, k
        self.weights = [(torch.empty(0, device="cpu"),)]


@pytest.mark.parametrize("m", kq.BATCHES)
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_swept_configs_run_the_8b_shapes(kind, m):
    for _, n, k in kq.LLAMA3_8B:
        cfgs = _Case(kind, n, k).configs(m, quick=False)
        assert len({c.label for c in cfgs}) == len(cfgs)
        refused = [c.label for c in cfgs if c.variant != "cuda_gemv"  # no extension on a CPU
                   and not (i4.valid_config(c, kq.GROUP) if kind == "int4"
                            else i8.valid_config(c, k))]
        assert refused == []
        splits = {c.split_k for c in cfgs}
        assert (splits > {1}) == (m <= 64), splits
