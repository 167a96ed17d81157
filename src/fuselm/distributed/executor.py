"""What ``LLMEngine.step`` runs the model through: ``executor.step(scheduler)`` schedules, runs
and returns ``(SchedulerOutput, StepResult | None)``.

- ``LocalExecutor``: one process; ``runner.execute`` as before.
- ``DistributedExecutor`` (rank 0 of several): encodes each schedule as a plan (``step_plan``),
  sends it to the other ranks, runs stage 0 itself, and gets the sampled tokens from the last
  stage. With pipeline stages, up to ``pp_size`` micro-batches are in flight: the scheduler is
  asked for another batch of requests that are not in flight while earlier ones are still in
  later stages, so no stage idles; results come back in order.
- ``Worker`` (ranks other than 0) lives in ``worker.py``.

A failure of any rank ends the engine: the step raises ``EngineDeadError`` naming the rank, and
every later step raises it at once.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from fuselm.distributed.launch import DistributedContext
from fuselm.distributed.pipeline import StageLinks
from fuselm.distributed.step_plan import (
    FLAG_DEVICE_INPUTS,
    FLAG_KEEP_ARGMAX,
    KIND_NOOP,
    KIND_STOP,
    StepHeader,
    decode_result,
    encode_batch,
    encode_sampling,
    result_len,
)
from fuselm.distributed.worker import StageRunner, Worker
from fuselm.engine.async_executor import AsyncLocalExecutor
from fuselm.engine.model_runner import ModelRunner, PendingStep, StepResult, all_plain_greedy
from fuselm.engine.request import Request
from fuselm.engine.scheduler import Scheduler, SchedulerOutput
from fuselm.errors import EngineDeadError

logger = logging.getLogger(__name__)


class LocalExecutor:
    """A single process: the runner executes each schedule."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def step(self, scheduler: Scheduler) -> tuple[SchedulerOutput, StepResult | None]:
        """Schedules and runs one step; the result is None when nothing was scheduled."""
        out = scheduler.schedule()
        return out, (None if out.is_empty else self.runner.execute(out))

    def shutdown(self) -> None:
        """Nothing to release."""


@dataclass
class _InFlight:
    out: SchedulerOutput
    header: StepHeader
    result: StepResult | None  # known at once when rank 0 samples (no pipeline stages)


class DistributedExecutor:
    """Rank 0's side of a distributed engine (see the module docstring)."""

    def __init__(self, runner: ModelRunner, ctx: DistributedContext, vocab_size: int,
                 capture_graphs: bool, async_scheduling: bool = False,
                 max_model_len: int = 0) -> None:
        self.runner, self.ctx, self.vocab_size = runner, ctx, vocab_size
        # async scheduling: one pipeline stage only (stages already overlap micro-batches)
        self.ahead = (AsyncLocalExecutor(runner, max_model_len, launch=self._launch,
                                         greedy_only=True)
                      if async_scheduling and ctx.pp_size == 1 else None)
        self.links = StageLinks()
        self.stage = StageRunner(runner, self.links)
        if capture_graphs and ctx.pp_size > 1:  # with one stage, the runner captured them
            self.stage.capture_graphs()
        self.max_in_flight = ctx.pp_size
        self.in_flight: deque[_InFlight] = deque()
        self.dead: str | None = None
        self.num_steps = 0
        self.max_in_flight_seen = 0  # micro-batches in flight at once (pipeline overlap)
        self._gen_keys: dict[Request, int] = {}
        self._next_key = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._last_send = time.monotonic()
        ctx.monitor.on_failure.append(self._on_failure)
        threading.Thread(target=self._keepalive, name="fuselm-keepalive", daemon=True).start()
        atexit.register(self.shutdown)

    def _on_failure(self, message: str) -> None:
        """The monitor saw a rank fail: later steps raise at once (an idle engine too)."""
        if self.dead is None:
            self.dead = message

    @property
    def world_size(self) -> int:
        """Ranks of the engine."""
        return self.ctx.world_size

    def step(self, scheduler: Scheduler) -> tuple[SchedulerOutput, StepResult | None]:
        """Fills the pipeline with micro-batches, then returns the oldest one's result."""
        with self._lock:
            if self.dead is not None:
                raise EngineDeadError(f"the distributed engine failed: {self.dead}")
            try:
                if self.ahead is not None:
                    return self.ahead.step(scheduler)
                self._fill(scheduler)
                if not self.in_flight:
                    return SchedulerOutput(), None
                return self._collect()
            except Exception as exc:
                self.dead = self.ctx.monitor.diagnose(exc)
                raise EngineDeadError(f"the distributed engine failed: {self.dead}") from exc

    @torch.inference_mode()
    def _launch(self, out: SchedulerOutput, input_ids: torch.Tensor | None = None
                ) -> PendingStep:
        """Sends the plan of ``out``, runs rank 0's shard and queues the sampling, without
        waiting for the device; ``input_ids``: the previous step's tokens, on the device."""
        reqs = [s.request for s in out.sequences if s.sample]
        greedy = all_plain_greedy(reqs)
        _, logits = self._plan_and_forward(out, reqs, input_ids, keep_argmax=greedy)
        return self.runner.sample_launched(out, logits, reqs, greedy)

    @property
    def num_pipelined_steps(self) -> int:
        """Steps planned before the previous one's tokens were read (async scheduling)."""
        return self.ahead.num_pipelined_steps if self.ahead is not None else 0

    def _fill(self, scheduler: Scheduler) -> None:
        while len(self.in_flight) < self.max_in_flight:
            if self.max_in_flight == 1:
                out = scheduler.schedule()
            else:  # share the active sequences between the micro-batches
                busy = {s.request for f in self.in_flight for s in f.out.sequences}
                active = min(len(scheduler.running) + len(scheduler.waiting),
                             scheduler.config.max_num_seqs)
                out = scheduler.schedule(exclude=busy,
                                         max_num_seqs=max(1, -(-active // self.max_in_flight)))
            if out.is_empty:
                return
            self._submit(out)

    @torch.inference_mode()
    def _submit(self, out: SchedulerOutput) -> None:
        reqs = [s.request for s in out.sequences if s.sample]
        header, logits = self._plan_and_forward(out, reqs)
        result = None
        if logits is not None:
            result = self.runner.finish(self.runner.sample_launched(out, logits, reqs, False))
        self.in_flight.append(_InFlight(out, header, result))
        self.max_in_flight_seen = max(self.max_in_flight_seen, len(self.in_flight))

    def _plan_and_forward(self, out: SchedulerOutput, reqs: list[Request],
                          device_ids: torch.Tensor | None = None, keep_argmax: bool = False
                          ) -> tuple[StepHeader, torch.Tensor | None]:
        """Fills the inputs of ``out``, sends its plan and runs rank 0's stage; the header and,
        when rank 0 is on the last stage, the logits of the sampling rows ``reqs``.
        ``device_ids`` (the previous step's tokens, on the device) replace the host's input ids
        here and, through ``FLAG_DEVICE_INPUTS``, on every rank; ``keep_argmax``: every rank
        keeps its argmax of this step for the next one (``FLAG_KEEP_ARGMAX``)."""
        runner = self.runner
        graph = runner._graph_size(out)  # the same decode graph sizes on every rank
        ids, pos, batch, num_logits = runner.buffers.fill(out, pad_to=graph)
        if device_ids is not None:
            runner.buffers.input_ids[: len(out.sequences)].copy_(device_ids)
        header, parts = encode_batch(runner.buffers, batch, num_logits, len(out.sequences),
                                     graph)
        if keep_argmax:
            header.flags |= FLAG_KEEP_ARGMAX
        if device_ids is not None:
            header.flags |= FLAG_DEVICE_INPUTS
        if not self.links.is_last:  # the last stage samples: it needs the parameters
            parts += encode_sampling(reqs, self.vocab_size, self._key_of, self._released(),
                                     header)
        payload = torch.cat(parts)
        header.payload_len, header.step_id = payload.numel(), self.num_steps
        self._send(header, payload)
        logits = self.stage.forward(ids, pos, batch, header)
        self.num_steps += 1
        return header, logits

    def _collect(self) -> tuple[SchedulerOutput, StepResult]:
        done = self.in_flight.popleft()
        if done.result is None:
            h = done.header
            encoded = self.links.recv_result(result_len(h.num_logits, h.max_logprobs))
            sampled = decode_result(encoded, h.num_logits, h.max_logprobs)
            done.result = self.runner._to_host(done.out, sampled)
        return done.out, done.result

    def _send(self, header: StepHeader, payload: torch.Tensor) -> None:
        self.links.send_plan(header, payload)
        self._last_send = time.monotonic()

    def _key_of(self, req: Request) -> int:
        """The sampling rank's handle of a seeded sequence's generator."""
        if req not in self._gen_keys:
            self._gen_keys[req] = next(self._next_key)
        return self._gen_keys[req]

    def _released(self) -> list[int]:
        done = [r for r in self._gen_keys if r.is_finished]
        return [self._gen_keys.pop(r) for r in done]

    def _keepalive(self) -> None:
        """Idle workers wait in a collective bounded by the timeout: a NOOP plan now and then
        tells them rank 0 is alive and merely has nothing to do."""
        interval = max(0.5, self.ctx.timeout / 4)
        while not self._closed.wait(interval / 4):
            if time.monotonic() - self._last_send < interval or self.dead is not None:
                continue
            if not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed.is_set() and self.dead is None:
                    self._send(StepHeader(kind=KIND_NOOP), torch.empty(0, dtype=torch.int64))
            except Exception as exc:  # noqa: BLE001 - the next step reports it
                self.dead = self.ctx.monitor.diagnose(exc)
            finally:
                self._lock.release()

    def shutdown(self) -> None:
        """Finishes the micro-batches in flight, stops the workers, releases the groups."""
        if self._closed.is_set():
            return
        acquired = self._lock.acquire(timeout=self.ctx.timeout)
        try:
            self._closed.set()
            self.ctx.monitor.stop()
            if self.dead is None and acquired:
                try:
                    if self.ahead is not None:  # its step in flight is aborted with the engine
                        self.ahead.shutdown()
                    while self.in_flight:
                        self._collect()
                    self._send(StepHeader(kind=KIND_STOP), torch.empty(0, dtype=torch.int64))
                    self.links.pending.wait_all()
                except Exception as exc:  # noqa: BLE001
                    logger.warning("distributed shutdown: %s", exc)
                    self.dead = str(exc)
            if self.dead is not None:
                for proc in self.ctx.procs.values():
                    proc.kill()
            self.runner.release_graphs()
            self.ctx.shutdown()
        finally:
            if acquired:
                self._lock.release()


def make_executor(runner: ModelRunner, ctx: DistributedContext | None, vocab_size: int,
                  capture_graphs: bool = False, async_scheduling: bool = False,
                  max_model_len: int = 0) -> Any:
    """The executor of this process: local, rank 0 of several, or a worker.
    ``capture_graphs``: capture pipeline stages' decode graphs (CUDA, not enforce_eager);
    ``async_scheduling``: rank 0 plans a step ahead (one pipeline stage)."""
    if ctx is None:
        return LocalExecutor(runner)
    if ctx.rank == 0:
        return DistributedExecutor(runner, ctx, vocab_size, capture_graphs, async_scheduling,
                                   max_model_len)
    return Worker(runner, vocab_size, capture_graphs)
