"""Structured outputs across ranks: a plan whose sampling runs on another rank (the last
pipeline stage) carries rank 0's token bitmask; decoding the plan gives the bitmask that
``build_sampling_tensors`` builds locally (the reference), bit for bit, constrained and free
rows mixed."""

from __future__ import annotations

import torch

from fuselm.distributed.step_plan import (
    FLAG_BITMASK,
    StepHeader,
    batch_payload_len,
    decode_sampling,
    encode_sampling,
)
from fuselm.engine.request import Request
from fuselm.engine.sampling_inputs import build_sampling_tensors
from fuselm.sampling_params import SamplingParams, StructuredOutputsParams
from fuselm.structured import GrammarCompiler
from fuselm.tokenizer import Tokenizer

VOCAB = 49152


def _requests(tok: Tokenizer) -> list[Request]:
    compiler = GrammarCompiler(tok, VOCAB, {2})
    regex = compiler.compile(StructuredOutputsParams(regex="[0-9]{2,5}"))
    choice = compiler.compile(StructuredOutputsParams(choice=["north", "south"]))
    rows = [(regex, "12"), (None, "free text"), (choice, "no"), (regex, "")]
    reqs = []
    for i, (grammar, generated) in enumerate(rows):
        params = SamplingParams(temperature=0.5 * i, seed=i)
        req = Request(f"r{i}", [5, 6, 7], params,
                      grammar=grammar.matcher() if grammar is not None else None)
        req.output_token_ids = tok.encode(generated, add_special_tokens=False)
        reqs.append(req)
    return reqs


def test_plan_carries_the_bitmask_built_on_rank_0(default_gguf_path):
    tok = Tokenizer.from_gguf(default_gguf_path)
    local = build_sampling_tensors(_requests(tok), VOCAB, torch.device("cpu"))
    reqs = _requests(tok)  # fresh grammars: encoding advances them as the local path did
    header = StepHeader()
    parts = encode_sampling(reqs, VOCAB, key_of=lambda r: int(r.request_id[1:]) + 1,
                            release=[], header=header)
    assert header.flags & FLAG_BITMASK
    header.payload_len = batch_payload_len(header) + sum(p.numel() for p in parts)
    payload = torch.cat([torch.zeros(batch_payload_len(header), dtype=torch.int64), *parts])
    remote = decode_sampling(header, payload, VOCAB, torch.device("cpu"), {})
    assert local.token_bitmask is not None and remote.token_bitmask is not None
    assert torch.equal(remote.token_bitmask, local.token_bitmask)
    assert (local.token_bitmask[1] == -1).all() and not (local.token_bitmask[0] == -1).all()


def test_free_plan_has_no_bitmask(default_gguf_path):
    reqs = [Request("f", [1, 2], SamplingParams(temperature=0.0))]
    header = StepHeader()
    encode_sampling(reqs, VOCAB, key_of=lambda r: 1, release=[], header=header)
    assert not header.flags & FLAG_BITMASK
