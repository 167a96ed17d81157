"""A rank's pipeline stage: the forward of one plan on this rank's shard, and the loop of the
ranks other than 0.

Every rank holds a ``ModelRunner`` built exactly as rank 0 builds its own (same model code, its
TP shard of its PP stage, a KV cache of the same number of blocks). ``StageRunner.forward``
runs a step on it: the first stage embeds, later stages receive ``(hidden, residual)`` from the
previous one, non-last stages send theirs on, the last stage returns logits. A ``Worker`` turns
received plans into those steps; on the last stage its TP rank 0 samples (when rank 0 is not
on the last stage) and sends the tokens to rank 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from fuselm.distributed.pipeline import StageLinks
from fuselm.distributed.step_plan import (
    FLAG_DEVICE_INPUTS,
    FLAG_KEEP_ARGMAX,
    KIND_NOOP,
    KIND_STOP,
    StepHeader,
    decode_batch,
    decode_sampling,
    encode_result,
)
from fuselm.engine.model_runner import ModelRunner, graph_batch_sizes
from fuselm.engine.sampling_inputs import build_sampling_tensors
from fuselm.engine.scheduler import SchedulerOutput
from fuselm.forward_batch import ForwardBatch
from fuselm.layers.sampler import sample
from fuselm.parallel import parallel_state as ps

logger = logging.getLogger(__name__)


class StageRunner:
    """Runs this rank's stage of a step (rank 0 and workers alike)."""

    def __init__(self, runner: ModelRunner, links: StageLinks) -> None:
        self.runner, self.model, self.links = runner, runner.model, links
        param = next(self.model.parameters())
        self.dtype, self.device = param.dtype, runner.device
        self.hidden_size = self.model.config.hidden_size
        self._graph_inputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Decode CUDA graphs of this pipeline stage, one per size of ``graph_batch_sizes``
        (into ``runner.graphs``: output logits on the last stage, else (hidden, residual)).

        A graph holds no point-to-point traffic: the previous stage's output is copied into
        static inputs before the replay and the static outputs are sent after it. The TP ranks
        of a stage capture together (their all-reduces are inside the graphs).
        """
        if self.device.type != "cuda":
            return
        shape = (max(graph_batch_sizes(self.runner.max_num_seqs)), self.hidden_size)
        self._graph_inputs = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                              torch.zeros(shape, dtype=self.dtype, device=self.device))
        self.runner.capture_cuda_graphs(self._graph_body)

    def _graph_body(self, ids: torch.Tensor, pos: torch.Tensor, batch: ForwardBatch,
                    size: int) -> Any:
        inputs = None
        if not self.links.is_first:
            inputs = (self._graph_inputs[0][:size], self._graph_inputs[1][:size])
        out = self.model(ids, pos, batch, intermediate=inputs)
        if not self.links.is_last:
            return out
        return self.model.compute_logits(out, self.runner.graph_logits_out(size))

    def _replay(self, header: StepHeader) -> torch.Tensor | None:
        size = header.graph_size
        if not self.links.is_first:
            hidden, residual = self.links.recv_intermediate(size, self.hidden_size, self.dtype,
                                                            self.device)
            self._graph_inputs[0][:size].copy_(hidden)
            self._graph_inputs[1][:size].copy_(residual)
        out = self.runner.replay(size)
        if self.links.is_last:
            return out[: header.num_real_seqs]
        self.links.send_intermediate(out[0], out[1])  # stacked into a fresh tensor: the next
        return None  # replay may overwrite the static outputs while the send is pending

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, batch: ForwardBatch,
                header: StepHeader) -> torch.Tensor | None:
        """The stage's part of the step; float32 logits of the sampling rows on the last
        stage, else None (the output went to the next stage)."""
        if header.graph_size:
            return self._replay(header)
        intermediate = None
        if not self.links.is_first:
            intermediate = self.links.recv_intermediate(header.num_tokens, self.hidden_size,
                                                        self.dtype, self.device)
        out = self.model(ids, pos, batch, intermediate=intermediate)
        if not self.links.is_last:
            self.links.send_intermediate(*out)
            return None
        return self.model.compute_logits(out[batch.logits_indices])


class Worker:
    """The loop of a rank other than 0: receive a plan, run the stage, until STOP."""

    def __init__(self, runner: ModelRunner, vocab_size: int, capture_graphs: bool) -> None:
        self.links = StageLinks()
        self.stage = StageRunner(runner, self.links)
        if capture_graphs and ps.get_pp_size() > 1:
            self.stage.capture_graphs()
        self.runner, self.vocab_size = runner, vocab_size
        self.samples = self.links.rank == self.links.sampler_rank != 0
        self.generators: dict[int, torch.Generator] = {}
        self.num_steps = 0
        self.last_tokens: torch.Tensor | None = None  # this rank's argmax of the last step

    def run(self) -> None:
        """Serves plans until rank 0 sends STOP."""
        logger.info("rank %d: serving (stage %d of %d, layers %d-%d)", self.links.rank,
                    ps.get_pp_rank(), ps.get_pp_size(), self.runner.model.start_layer,
                    self.runner.model.end_layer - 1)
        while True:
            header, msg, payload = self.links.recv_plan()
            self.links.forward_plan(header, msg, payload)
            if header.kind == KIND_STOP:
                break
            if header.kind != KIND_NOOP:
                self.step(header, payload)
        self.links.pending.wait_all()
        self.runner.release_graphs()
        logger.info("rank %d: stopped after %d steps", self.links.rank, self.num_steps)

    @torch.inference_mode()
    def step(self, header: StepHeader, payload: torch.Tensor) -> None:
        """One plan: inputs into the buffers, the stage's forward, sampling if ours."""
        ids, pos, batch = decode_batch(header, payload, self.runner.buffers)
        if header.flags & FLAG_DEVICE_INPUTS:
            if self.last_tokens is None or self.last_tokens.shape[0] != header.num_real_seqs:
                raise RuntimeError(f"rank {self.links.rank}: a plan takes device inputs but "
                                   "the previous step kept no matching tokens")
            self.runner.buffers.input_ids[: header.num_real_seqs].copy_(self.last_tokens)
        logits = self.stage.forward(ids, pos, batch, header)
        self.num_steps += 1
        if logits is not None and header.flags & FLAG_KEEP_ARGMAX:
            self.last_tokens = self.runner.kernels.argmax(logits)
        if logits is None or not self.samples or header.num_logits == 0:
            return
        tensors = decode_sampling(header, payload, self.vocab_size, self.stage.device,
                                  self.generators)
        self.links.send_result(encode_result(sample(logits, tensors, self.runner.kernels.argmax),
                                            header.max_logprobs))


def stage_profile_execute(runner: ModelRunner) -> Callable[[SchedulerOutput], Any]:
    """A stand-alone step of this stage for KV-cache profiling: zeros stand in for the previous
    stage's output, so that stages profile at once without talking to each other (TP peers
    run it together: their all-reduces pair up)."""
    model = runner.model

    @torch.inference_mode()
    def execute(out: SchedulerOutput) -> None:
        ids, pos, batch, _ = runner.buffers.fill(out)
        intermediate = None
        if not ps.is_first_pp_rank():
            param = next(model.parameters())
            zeros = torch.zeros(ids.shape[0], model.config.hidden_size, dtype=param.dtype,
                                device=runner.device)
            intermediate = (zeros, zeros.clone())
        hidden = model(ids, pos, batch, intermediate=intermediate)
        if ps.is_last_pp_rank():
            logits = model.compute_logits(hidden[batch.logits_indices])
            reqs = [s.request for s in out.sequences if s.sample]
            sample(logits, build_sampling_tensors(reqs, runner.vocab_size, runner.device),
                   runner.kernels.argmax)

    return execute
