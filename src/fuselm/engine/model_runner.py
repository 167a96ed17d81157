"""Runs the model on one step's batch: inputs into persistent buffers, forward (a CUDA graph for
decode batches), logits for the rows that sample, sampling on the device.

Only sampled token ids (and requested logprobs) come back to the host.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fuselm.engine.input_batch import InputBuffers
from fuselm.engine.kv_mover import KVBlockMover
from fuselm.engine.kv_tiers import TransferRates
from fuselm.engine.prompt_logprobs import (
    PromptEntries,
    compute_prompt_logprobs,
    wants_prompt_logprobs,
)
from fuselm.engine.sampling_inputs import build_sampling_tensors
from fuselm.engine.scheduler import SchedulerOutput
from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers.sampler import SamplerOutput, sample

logger = logging.getLogger(__name__)

# (input ids, positions, ForwardBatch, graph batch size) -> what a decode graph returns
GraphBody = Callable[..., Any]


@dataclass
class StepResult:
    """Sampled tokens per scheduled sequence (None: no token this step) and their logprobs."""

    token_ids: list[int | None]
    logprobs: list[dict[int, float] | None]
    prompt_logprobs: list[PromptEntries | None] | None = None
    """Per scheduled sequence, the prompt logprobs its chunk computed (None: none asked)."""


@dataclass
class LaunchedStep:
    """A step queued on the device: its schedule, the device result, and where its tokens land
    on the host. ``result()`` waits for this step only; ``device_tokens`` feed a step launched
    before the host has read them (async scheduling)."""

    out: SchedulerOutput
    sampled: SamplerOutput
    host_tokens: torch.Tensor | None
    event: torch.cuda.Event | None
    greedy: bool = False  # plain greedy: the tokens are the logits' argmax
    prompt_logprobs: list[PromptEntries | None] | None = None

    @property
    def device_tokens(self) -> torch.Tensor:
        """The sampled token ids ``[num_sampling_rows]`` int64, on the device."""
        return self.sampled.token_ids

    def result(self) -> StepResult:
        """Waits for the step and returns its tokens on the host."""
        if self.event is not None:
            self.event.synchronize()
            ids = self.host_tokens.tolist()
        else:
            ids = self.sampled.token_ids.tolist()
        result = step_result(self.out, self.sampled, ids)
        result.prompt_logprobs = self.prompt_logprobs
        return result

    def finish_sampling(self) -> None:
        """Nothing: this step's sampling is queued already."""


@dataclass
class DeferredSampling:
    """A step whose forward is queued and whose sampling waits for ``finish_sampling``: the
    structured-output masks of its sequences need the previous step's tokens, which the host
    reads while this forward runs (so the mask fill overlaps it)."""

    runner: ModelRunner
    out: SchedulerOutput
    logits: torch.Tensor
    reqs: list
    launched: LaunchedStep | None = None
    prompt_logprobs: list[PromptEntries | None] | None = None

    def finish_sampling(self) -> None:
        """Builds the sampling inputs (masks included) and queues the sampling; once."""
        if self.launched is None:
            self.launched = self.runner.sample_launched(self.out, self.logits, self.reqs,
                                                        greedy=False)
            self.launched.prompt_logprobs = self.prompt_logprobs

    @property
    def device_tokens(self) -> torch.Tensor:
        """The sampled token ids on the device, once ``finish_sampling`` queued them."""
        if self.launched is None:
            raise RuntimeError("a step cannot follow one whose sampling is not queued yet")
        return self.launched.device_tokens

    def result(self) -> StepResult:
        """Queues the sampling if still needed, waits for it and returns the tokens."""
        self.finish_sampling()
        assert self.launched is not None
        return self.launched.result()


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """A zero tensor; on a CPU its pages become resident only when first written (calloc'd
    memory the kernel maps lazily), so a KV cache sized for the whole context costs only the
    blocks in use: 0.38 GB of float32 cache for SmolLM2's 8192 tokens, ~10 MB for a short chat."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    numel = 1
    for size in shape:
        numel *= size
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.from_numpy(np.zeros(numel * itemsize, dtype=np.uint8))
    return raw.view(dtype).view(shape)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every 16 up to the limit."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class ModelRunner:
    """Owns the model, its KV cache tensors, the input buffers and the decode CUDA graphs."""

    def __init__(self, model: nn.Module, vocab_size: int, device: torch.device,
                 max_num_tokens: int, max_num_seqs: int, max_model_len: int,
                 block_size: int, kernels: KernelSet | None = None) -> None:
        self.model, self.vocab_size, self.device = model, vocab_size, device
        self.kernels = kernels or KernelSet(device=device)  # the model's; graphs switch it
        self.max_num_seqs, self.block_size = max_num_seqs, block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.buffers = InputBuffers(max_num_tokens, max_num_seqs, self.max_blocks_per_seq,
                                    block_size, device)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_graph_replays = 0
        pin = device.type == "cuda"
        self._host_tokens = [torch.zeros(max_num_seqs, dtype=torch.int64, pin_memory=pin)
                             for _ in range(2)]
        self._host_slot = 0
        self._graph_logits: torch.Tensor | None = None
        # the KV cache's dtype where it is not the model's (--kv-cache-dtype fp8); None: the
        # dtype callers pass to allocate_kv_cache / kv_bytes_per_block
        self.kv_cache_dtype: torch.dtype | None = None
        self.kv_rates = TransferRates()  # copy and prefill rates: the scheduler's swap choice
        self.kv_mover: KVBlockMover | None = None  # the CPU KV cache (swap, prefix tier)

    def graph_logits_bytes(self) -> int:
        """Bytes of the logits buffer that the decode graphs of more than one row share."""
        rows = self._max_graph_rows()
        return rows * self.vocab_size * 4 if rows > 1 else 0

    def _max_graph_rows(self) -> int:
        return max(graph_batch_sizes(self.max_num_seqs))

    def graph_logits_out(self, size: int) -> torch.Tensor | None:
        """Where a decode graph of ``size`` rows writes its logits: one buffer that all sizes
        above 1 share (replays run one at a time, each sampled before the next), so that the
        graphs do not each keep their own; None (a fresh tensor) for batch 1."""
        if size == 1:
            return None
        if self._graph_logits is None:
            self._graph_logits = torch.empty(self._max_graph_rows(), self.vocab_size,
                                             dtype=torch.float32, device=self.device)
        return self._graph_logits[:size]

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        """Allocates ``[num_blocks, block_size, kv_heads, head_size]`` K and V per layer, of
        ``kv_cache_dtype`` when set, else ``dtype``."""
        dtype = self.kv_cache_dtype or dtype
        self.kv_caches = []
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_size)
            k = zeros_on_demand(shape, dtype, self.device)
            v = zeros_on_demand(shape, dtype, self.device)
            attn.bind_kv_cache(k, v)
            self.kv_caches.append((k, v))

    def allocate_cpu_kv_cache(self, num_cpu_blocks: int) -> None:
        """A pinned CPU cache of ``num_cpu_blocks`` blocks in the device cache's layout (after
        ``allocate_kv_cache``), which ``SchedulerOutput.kv_copies`` move blocks to and from."""
        self.kv_mover = KVBlockMover(self.kv_caches, num_cpu_blocks, self.kv_rates)

    def kv_bytes_per_block(self, dtype: torch.dtype) -> int:
        """Bytes one KV block takes over all of this stage's layers (in ``kv_cache_dtype``
        when set, else ``dtype``: 1 byte an element for fp8)."""
        itemsize = torch.empty(0, dtype=self.kv_cache_dtype or dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_size * itemsize
                   for a in self.model.attention_layers())

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, input_ids: torch.Tensor | None = None,
               defer_sampling: bool = False) -> LaunchedStep | DeferredSampling:
        """Queues one step on the device without waiting for it. ``input_ids`` (on the device,
        a row per sequence) replaces the host's token ids: the previous step's samples. With
        ``defer_sampling`` only the forward is queued (see ``DeferredSampling``)."""
        num_seqs = len(out.sequences)
        if out.kv_copies is not None:  # block moves first: this forward reads or rewrites them
            self._move_kv(out)
        graph_size = self.graph_size_for(out)
        prompt_lp = None
        if graph_size is not None:
            self.buffers.fill(out, pad_to=graph_size)
            if input_ids is not None:
                self.buffers.input_ids[:num_seqs].copy_(input_ids)
            logits = self.replay(graph_size)[:num_seqs]
        else:
            ids, pos, batch, _ = self.buffers.fill(out)
            if input_ids is not None:
                ids[:num_seqs].copy_(input_ids)
            with self._timed_forward(out):
                hidden = self.model(ids, pos, batch)
                logits = self.model.compute_logits(hidden[batch.logits_indices])
            if wants_prompt_logprobs(out):
                prompt_lp = compute_prompt_logprobs(out, hidden, self.model.compute_logits)
        reqs = [s.request for s in out.sequences if s.sample]
        if defer_sampling:
            return DeferredSampling(self, out, logits, reqs, prompt_logprobs=prompt_lp)
        step = self.sample_launched(out, logits, reqs, all_plain_greedy(reqs))
        step.prompt_logprobs = prompt_lp
        return step

    def _move_kv(self, out: SchedulerOutput) -> None:
        if self.kv_mover is None:
            raise RuntimeError("a step moves KV blocks, but this runner has no CPU KV cache")
        self.kv_mover.run(out.kv_copies)  # type: ignore[arg-type]

    def _timed_forward(self, out: SchedulerOutput) -> contextlib.AbstractContextManager:
        """Times a long eager forward into the prefill rate (where a CPU cache exists)."""
        if self.kv_mover is None:
            return contextlib.nullcontext()
        return self.kv_mover.timed_forward(out.num_tokens)

    def sample_launched(self, out: SchedulerOutput, logits: torch.Tensor, reqs: list,
                        greedy: bool) -> LaunchedStep:
        """Queues the sampling of ``logits`` (rows of the sampling requests ``reqs``; ``greedy``:
        all plain greedy, so an argmax) and the copy of the tokens to the host."""
        if greedy:
            result = SamplerOutput(token_ids=self.kernels.argmax(logits))  # no per-step tensors
        else:
            result = sample(logits, build_sampling_tensors(reqs, self.vocab_size, self.device),
                            self.kernels.argmax)
        if self.device.type != "cuda":
            return LaunchedStep(out, result, None, None, greedy)
        self._host_slot ^= 1  # two pinned buffers: a step's tokens are read after the next launch
        host = self._host_tokens[self._host_slot][: result.token_ids.shape[0]]
        host.copy_(result.token_ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return LaunchedStep(out, result, host, event, greedy)

    def graph_size_for(self, out: SchedulerOutput) -> int | None:
        """The decode CUDA graph that runs ``out`` (the smallest size holding its sequences),
        or None for an eager step."""
        if not self.graphs or not out.is_decode:
            return None
        if not all(s.sample for s in out.sequences):
            return None
        n = len(out.sequences)
        return next((size for size in sorted(self.graphs) if size >= n), None)

    def replay(self, size: int) -> Any:
        """Replays the decode graph of ``size`` rows on the filled buffers; its static output."""
        graph, out = self.graphs[size]
        graph.replay()
        self.num_graph_replays += 1
        return out

    def release_graphs(self) -> None:
        """Frees the decode CUDA graphs (before the process groups whose collectives they
        captured are destroyed: a communicator still referenced by a graph can hang there)."""
        if not self.graphs:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self._graph_logits = None

    @torch.inference_mode()
    def capture_cuda_graphs(self, body: GraphBody | None = None) -> None:
        """Captures one decode graph per batch size in ``graph_batch_sizes`` into ``graphs``.
        ``body(ids, positions, batch, size)`` is what a graph runs and returns (default: the
        model and its logits; a pipeline stage passes its own)."""
        if self.device.type != "cuda":
            return
        with self.graph_kernels():
            self._capture_all(body or self._logits_body)
        logger.info("captured decode CUDA graphs for batch sizes %s", sorted(self.graphs))

    def _logits_body(self, ids: torch.Tensor, pos: torch.Tensor, batch, size: int) -> torch.Tensor:
        return self.model.compute_logits(self.model(ids, pos, batch),
                                         self.graph_logits_out(size))

    @contextlib.contextmanager
    def graph_kernels(self) -> Iterator[None]:
        """The layers use their CUDA-graph kernels inside, their eager ones again after."""
        with self.kernels.variant("graph"):
            yield

    def _capture_all(self, body: GraphBody) -> None:
        from fuselm.engine.scheduler import ScheduledSequence

        pool = torch.cuda.graph_pool_handle()
        dummy = _DummyRequest(self.block_size)
        for size in reversed(graph_batch_sizes(self.max_num_seqs)):
            fake = SchedulerOutput([ScheduledSequence(dummy, 1, True)])  # type: ignore[arg-type]
            ids, pos, batch, _ = self.buffers.fill(fake, pad_to=size)
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels
                body(ids, pos, batch, size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = body(ids, pos, batch, size)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize()


def step_result(out: SchedulerOutput, result: SamplerOutput,
                ids: list[int] | None = None) -> StepResult:
    """The host view of a sampler output: a token (or None) and logprobs per scheduled
    sequence; ``ids``: the token ids already read to the host."""
    ids = result.token_ids.tolist() if ids is None else ids
    wanted = result.sampled_logprobs is not None
    sampled_lp = result.sampled_logprobs.tolist() if wanted else None
    top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    top_ids = result.top_ids.tolist() if result.top_ids is not None else None
    tokens: list[int | None] = []
    logprobs: list[dict[int, float] | None] = []
    row = 0
    for seq in out.sequences:
        if not seq.sample:
            tokens.append(None)
            logprobs.append(None)
            continue
        tokens.append(ids[row])
        k = seq.request.sampling_params.logprobs
        if k is None or sampled_lp is None:
            logprobs.append(None)
        else:
            entry = {ids[row]: sampled_lp[row]}
            for tid, lp in zip((top_ids or [[]])[row][:k], (top_lp or [[]])[row][:k],
                               strict=True):
                entry.setdefault(tid, lp)
            logprobs.append(entry)
        row += 1
    return StepResult(tokens, logprobs)


def all_plain_greedy(reqs: list) -> bool:
    """Every request greedy with nothing that changes the logits or asks for logprobs."""
    return all(p.greedy and p.logprobs is None and not p.logit_bias and not p.uses_penalties
               and p.structured_outputs is None
               for p in (r.sampling_params for r in reqs))


class _DummyRequest:
    """A one-token sequence in block 0 used to fill buffers during graph capture."""

    def __init__(self, block_size: int) -> None:
        self.num_computed_tokens = 0
        self.num_prompt_tokens = 1
        self.prompt_token_ids = [0]
        self.output_token_ids: list[int] = []
        self.block_ids = [0]
