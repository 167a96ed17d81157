"""Step plans as tensors (one process): a batch, its sampling inputs and the sampled result
survive encoding exactly; the scheduler keeps micro-batches in flight apart."""

from __future__ import annotations

import random

import pytest
import torch

from fuselm.config import SchedulerConfig
from fuselm.distributed.step_plan import (
    HEADER_LEN,
    StepHeader,
    batch_payload_len,
    decode_batch,
    decode_result,
    decode_sampling,
    encode_batch,
    encode_result,
    encode_sampling,
)
from fuselm.engine.block_manager import BlockManager
from fuselm.engine.input_batch import InputBuffers
from fuselm.engine.request import Request
from fuselm.engine.sampling_inputs import build_sampling_tensors
from fuselm.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from fuselm.layers.sampler import sample
from fuselm.sampling_params import SamplingParams

VOCAB, BLOCK = 50, 4


def _buffers() -> InputBuffers:
    return InputBuffers(64, 8, 16, BLOCK, torch.device("cpu"))


def _request(i: int, params: SamplingParams, prompt_len: int, num_out: int,
             computed: int) -> Request:
    rng = random.Random(i)
    req = Request(f"r{i}", [rng.randrange(VOCAB + 5) for _ in range(prompt_len)], params,
                  index=i % 2)
    req.output_token_ids = [rng.randrange(VOCAB) for _ in range(num_out)]
    req.num_computed_tokens = computed
    req.block_ids = rng.sample(range(100), -(-(prompt_len + num_out) // BLOCK))
    if params.seed is not None:
        req.generator = torch.Generator().manual_seed(params.seed + req.index)
    return req


def _schedule() -> SchedulerOutput:
    params = SamplingParams(temperature=0.0)
    reqs = [_request(0, params, 13, 0, 0), _request(1, params, 9, 3, 11),
            _request(2, params, 30, 0, 8), _request(3, params, 5, 6, 10)]
    return SchedulerOutput([ScheduledSequence(reqs[0], 13, True),
                            ScheduledSequence(reqs[1], 1, True),
                            ScheduledSequence(reqs[2], 12, False),
                            ScheduledSequence(reqs[3], 1, True)])


@pytest.mark.parametrize("pad_to", [None, 8])
def test_batch_round_trip(pad_to):
    out = _schedule()
    if pad_to:  # a decode-only step, padded to a CUDA-graph size
        out.sequences = [s for s in out.sequences if s.num_new_tokens == 1]
    sent = _buffers()
    ids, pos, batch, num_logits = sent.fill(out, pad_to=pad_to)
    header, parts = encode_batch(sent, batch, num_logits, len(out.sequences), pad_to)
    payload = torch.cat(parts)
    header.payload_len = payload.numel()
    header = StepHeader.from_tensor(header.to_tensor())
    assert header.to_tensor().numel() == HEADER_LEN
    assert batch_payload_len(header) == payload.numel()
    got_ids, got_pos, got = decode_batch(header, payload, _buffers())
    assert torch.equal(got_ids, ids) and torch.equal(got_pos, pos)
    for name in ("query_start_loc", "seq_lens", "slot_mapping", "logits_indices"):
        assert torch.equal(getattr(got, name), getattr(batch, name)), name
    used = header.width  # columns past a row's blocks are never read
    assert torch.equal(got.block_tables[:, :used], batch.block_tables[:, :used])
    assert (got.max_query_len, got.max_seq_len) == (batch.max_query_len, batch.max_seq_len)


SAMPLING_CASES = {
    "greedy": [SamplingParams(temperature=0.0)] * 3,
    "mixed": [SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=3, logprobs=4),
              SamplingParams(temperature=1.3, min_p=0.1, top_k=VOCAB + 10)],
    "penalties": [SamplingParams(temperature=0.5, repetition_penalty=1.2, seed=9),
                  SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=-0.3,
                                 logit_bias={1: 3.0, VOCAB + 3: 1.0, 7: -2.5}),
                  SamplingParams(temperature=0.9, top_p=0.5)],
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_round_trip_equals_build_sampling_tensors(case):
    reqs = [_request(i, p, 7 + i, 3 * i, 0) for i, p in enumerate(SAMPLING_CASES[case])]
    want = build_sampling_tensors(reqs, VOCAB, torch.device("cpu"))
    header = StepHeader()
    parts = [torch.zeros(batch_payload_len(header), dtype=torch.int64)]
    parts += encode_sampling(reqs, VOCAB, lambda r: 100 + int(r.request_id[1:]), [5], header)
    generators = {5: torch.Generator()}
    got = decode_sampling(header, torch.cat(parts), VOCAB, torch.device("cpu"), generators)
    assert 5 not in generators, "a released generator must be dropped"
    for name, value in vars(want).items():
        if name == "generators":
            continue
        other = getattr(got, name)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and torch.equal(other, value), name
        elif isinstance(value, tuple):
            assert all(torch.equal(a, b) for a, b in zip(other, value, strict=True)), name
        else:
            assert other == value, name
    assert (want.generators is None) == (got.generators is None)
    logits = torch.randn(len(reqs), VOCAB, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # unseeded rows draw from the global generator
    got_ids = sample(logits, got).token_ids
    torch.manual_seed(1)
    assert torch.equal(got_ids, sample(logits, want).token_ids)


@pytest.mark.parametrize("k", [-1, 0, 3])
def test_result_round_trip(k):
    logits = torch.randn(5, VOCAB)
    params = SamplingParams(temperature=0.0, logprobs=None if k < 0 else k)
    reqs = [_request(i, params, 4, 0, 0) for i in range(5)]
    out = sample(logits, build_sampling_tensors(reqs, VOCAB, torch.device("cpu")))
    got = decode_result(encode_result(out, k), 5, k)
    for name in ("token_ids", "sampled_logprobs", "top_logprobs", "top_ids"):
        a, b = getattr(got, name), getattr(out, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name


def _scheduler(max_num_seqs: int, num_blocks: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                                     max_model_len=64),
                     BlockManager(num_blocks, BLOCK, enable_prefix_caching=False))


def test_micro_batches_take_disjoint_sequences():
    sched = _scheduler(8)
    for i in range(6):
        sched.add(Request(f"r{i}", [i + 1] * 5, SamplingParams(max_tokens=4), max_tokens=4))
    first = sched.schedule(max_num_seqs=3)
    busy = {s.request for s in first.sequences}
    second = sched.schedule(exclude=busy, max_num_seqs=3)
    third = sched.schedule(exclude=busy | {s.request for s in second.sequences})
    assert len(first.sequences) == len(second.sequences) == 3
    assert not busy & {s.request for s in second.sequences}
    assert third.is_empty, "every sequence is in flight"


def test_preemption_spares_sequences_in_flight():
    sched = _scheduler(4, num_blocks=6)  # 24 token slots
    for i in range(3):
        sched.add(Request(f"r{i}", [i + 1] * 8, SamplingParams(max_tokens=8), max_tokens=8))
    first = sched.schedule()
    sched.update(first, [1, 1, 1])  # 9 tokens each: the next decodes need a third block each
    r0, r1, r2 = (s.request for s in first.sequences)
    out = sched.schedule(exclude={r2})  # r2, the newest, would be the victim; it is in flight
    assert [s.request for s in out.sequences] == [r0]
    assert out.preempted == [r1]
    assert len(r2.block_ids) == 2 and r2 in sched.running
