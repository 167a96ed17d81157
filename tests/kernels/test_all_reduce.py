"""The one-shot all-reduce kernel, alone and fused with the residual add + RMSNorm, against a
float64 reference. Every rank of a simulated group runs in turn in one process: a rank's exchange
buffer is given its peers' inputs as the peers would store them, and its own stores land in
per-peer outboxes that the test inspects. (Two real GPUs: tests/distributed/
test_custom_all_reduce_gpu.py.)"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from fuselm.kernels import all_reduce as ar
from fuselm.kernels import triton_utils

pytestmark = pytest.mark.skipif(not triton_utils.triton_available(),
                                reason="Triton (or its interpreter) not available")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the interpreter's bf16 arithmetic is unreliable: bf16 only on a GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
EPS = 1e-6
RANK_NUMEL = 1024  # words of one rank's rows in a slot


class SimulatedGroup:
    """Exchange buffers, outboxes and call counters of ``world`` ranks in one process."""

    def __init__(self, world: int, dtype: torch.dtype) -> None:
        self.world, self.dtype = world, dtype
        self.word, self.empty = ar.word_dtype(dtype), ar.empty_word(dtype)
        words = ar.NUM_SLOTS * world * RANK_NUMEL

        def fresh() -> torch.Tensor:
            return torch.full((words,), self.empty, dtype=self.word, device=DEVICE)

        self.buffers = [fresh() for _ in range(world)]
        self.outboxes = [[fresh() for _ in range(world)] for _ in range(world)]
        self.states = [torch.zeros(2, dtype=torch.int32, device=DEVICE) for _ in range(world)]

    def peers(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s view of every buffer: its own, and outboxes for the others."""
        ptrs = [self.buffers[p].data_ptr() if p == rank else self.outboxes[rank][p].data_ptr()
                for p in range(self.world)]
        return torch.tensor(ptrs, dtype=torch.int64, device=DEVICE)

    def rows(self, buffer: torch.Tensor, slot: int, sender: int, numel: int) -> torch.Tensor:
        start = (slot * self.world + sender) * RANK_NUMEL
        return buffer[start : start + numel]

    def sent_bits(self, x: torch.Tensor) -> torch.Tensor:
        """x's words as a rank stores them: -0.0 turned into +0.0."""
        bits = x.reshape(-1).view(self.word).clone()
        bits[bits == self.empty] = 0
        return bits

    def deliver(self, rank: int, inputs: list[torch.Tensor], slot: int) -> None:
        """Stores every peer's input into ``rank``'s buffer, as the peers' kernels would."""
        for p in range(self.world):
            if p != rank:
                self.rows(self.buffers[rank], slot, p, inputs[p].numel()).copy_(
                    self.sent_bits(inputs[p]))


def _reference(inputs, residual, weight):
    """float64: the sum rounded to the dtype, the new residual, the normed output."""
    dtype = inputs[0].dtype
    total = sum(x.double() for x in inputs).to(dtype)
    new_residual = (total.double() + residual.double()).to(dtype)
    h = new_residual.double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    return total, new_residual, normed.to(dtype)


@pytest.mark.parametrize("fused", [True, False], ids=["add_rms_norm", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 64), (5, 129)])
def test_one_shot_all_reduce_matches_reference(fused, dtype, world, rows, hidden):
    torch.manual_seed(world * 1000 + rows * 10 + hidden)
    group = SimulatedGroup(world, dtype)
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    for call in range(3):  # slots 0, 1, 0: each is emptied and used again
        slot = call % 2
        inputs = [torch.randn(rows, hidden, dtype=dtype, device=DEVICE) for _ in range(world)]
        inputs[call % world][0, :3] = -0.0  # must not look like an empty word
        residual = torch.randn(rows, hidden, dtype=dtype, device=DEVICE)
        total, new_residual, normed = _reference(inputs, residual, weight)
        results = []
        for rank in range(world):
            group.deliver(rank, inputs, slot)
            x, res = inputs[rank].clone(), residual.clone()
            args = (group.peers(rank), group.buffers[rank], group.states[rank], rank, RANK_NUMEL)
            if fused:
                ar.one_shot_all_reduce_add_rms_norm(x, res, weight, EPS, *args)
                assert_close(res, new_residual, name=f"rank {rank} residual")
                assert_close(x, normed, name=f"rank {rank} normed")
                results.append((x, res))
            else:
                out = ar.one_shot_all_reduce(x, *args)
                assert torch.equal(x, inputs[rank]), "the plain all-reduce wrote its input"
                assert_close(out, total, name=f"rank {rank} sum")
                results.append((out,))
            for p in range(world):  # what this rank stored into each peer's buffer
                if p != rank:
                    box = group.rows(group.outboxes[rank][p], slot, rank, x.numel())
                    assert torch.equal(box, group.sent_bits(inputs[rank])), f"{rank} -> {p}"
                    box.fill_(group.empty)
            assert bool((group.buffers[rank] == group.empty).all()), "read rows not emptied"
            assert group.states[rank].tolist() == [call + 1, 0]
        for other in results[1:]:  # every rank holds the same bits
            assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_bad_input_is_rejected():
    group = SimulatedGroup(2, torch.float32)
    args = (group.peers(0), group.buffers[0], group.states[0], 0, RANK_NUMEL)
    with pytest.raises(ValueError, match="do not fit"):
        ar.one_shot_all_reduce(torch.zeros(2, RANK_NUMEL, device=DEVICE), *args)
    with pytest.raises(ValueError, match="contiguous"):
        ar.one_shot_all_reduce(torch.zeros(8, 4, device=DEVICE).t(), *args)
    with pytest.raises(ValueError, match="exchange buffer"):
        ar.one_shot_all_reduce(torch.zeros(2, 4, dtype=torch.float16, device=DEVICE), *args)
    x = torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        ar.one_shot_all_reduce_add_rms_norm(x, torch.zeros(3, 4, device=DEVICE),
                                            torch.ones(4, device=DEVICE), EPS, *args)
    with pytest.raises(ValueError, match="16- or 32-bit floats"):
        ar.word_dtype(torch.float64)
    assert group.states[0].tolist() == [0, 0], "a rejected call must not launch"
