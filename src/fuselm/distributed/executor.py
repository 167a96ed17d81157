"""Rank 0's executor of a distributed engine: the ``Executor`` protocol over several ranks.

``execute(out)`` encodes the schedule as a plan (``step_plan``), sends it to the other ranks,
runs stage 0 itself and returns a pending step: with one pipeline stage rank 0 samples (the
step is local from then on); with several, the last stage samples and ``result()`` receives the
tokens from it. The engine loop keeps up to ``max_in_flight = pp_size`` micro-batches in flight
and collects them in launch order. ``Worker`` (ranks other than 0) lives in ``worker.py``.

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
from collections.abc import Iterator
from contextlib import contextmanager

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
from fuselm.distributed.worker import StageRunner
from fuselm.engine.executor import PendingStep
from fuselm.engine.model_runner import (
    LaunchedStep,
    ModelRunner,
    StepResult,
    all_plain_greedy,
    step_result,
)
from fuselm.engine.request import Request
from fuselm.engine.scheduler import SchedulerOutput
from fuselm.errors import EngineDeadError

logger = logging.getLogger(__name__)


class _RankStep:
    """A step launched on every rank; its tokens come from rank 0 (``local``) or from the last
    pipeline stage (received in ``result``)."""

    def __init__(self, executor: DistributedExecutor, out: SchedulerOutput, header: StepHeader,
                 local: LaunchedStep | None) -> None:
        self.executor, self.out, self.header, self.local = executor, out, header, local
        self.greedy = local is not None and local.greedy

    @property
    def device_tokens(self) -> torch.Tensor:
        """Rank 0's sampled tokens on the device (one pipeline stage only)."""
        if self.local is None:
            raise RuntimeError("a step sampled on another rank has no tokens here")
        return self.local.device_tokens

    def result(self) -> StepResult:
        """Waits for the step's tokens (from the last stage when rank 0 does not sample)."""
        with self.executor.guarded():
            if self.local is not None:
                return self.local.result()
            return self.executor.receive(self)

    def finish_sampling(self) -> None:
        """Nothing: a distributed step's sampling is queued with its forward."""


class DistributedExecutor:
    """Rank 0's side of a distributed engine (see the module docstring)."""

    can_defer_sampling = False  # every rank takes a step's plan, sampling inputs included
    supports_prompt_logprobs = False  # the workers compute only the sampling rows' logits

    def __init__(self, runner: ModelRunner, ctx: DistributedContext, vocab_size: int,
                 capture_graphs: bool, async_scheduling: bool = False) -> None:
        self.runner, self.ctx, self.vocab_size = runner, ctx, vocab_size
        # async scheduling follows plain greedy steps only: every TP rank recomputes the argmax
        self.keep_argmax = async_scheduling and ctx.pp_size == 1
        self.links = StageLinks()
        self.stage = StageRunner(runner, self.links)
        if capture_graphs and ctx.pp_size > 1:  # with one stage, the runner captured them
            self.stage.capture_graphs()
        self.max_in_flight = ctx.pp_size
        self.unreceived: deque[_RankStep] = deque()  # steps whose tokens the last stage owes
        self.dead: str | None = None
        self.num_steps = 0
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

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Holds the executor's lock (against the keepalive) and turns any failure into
        ``EngineDeadError`` with the monitor's diagnosis."""
        with self._lock:
            if self.dead is not None:
                raise EngineDeadError(f"the distributed engine failed: {self.dead}")
            try:
                yield
            except Exception as exc:
                self.dead = self.ctx.monitor.diagnose(exc)
                raise EngineDeadError(f"the distributed engine failed: {self.dead}") from exc

    def can_follow(self, pending: PendingStep) -> bool:
        """Plain greedy steps of one pipeline stage, whose argmax every rank kept."""
        return self.keep_argmax and isinstance(pending, _RankStep) and pending.greedy

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, follows: PendingStep | None = None,
                defer_sampling: bool = False) -> _RankStep:
        """Sends the plan of ``out``, runs rank 0's stage and queues the sampling there (one
        stage) without waiting for the device; ``follows``: the step whose device tokens are
        this one's inputs on every rank."""
        if defer_sampling:
            raise ValueError("a distributed step samples with its forward (no deferred sampling)")
        with self.guarded():
            reqs = [s.request for s in out.sequences if s.sample]
            greedy = self.keep_argmax and all_plain_greedy(reqs)
            device_ids = None if follows is None else follows.device_tokens
            header, logits = self._plan_and_forward(out, reqs, device_ids, keep_argmax=greedy)
            local = None
            if logits is not None:
                local = self.runner.sample_launched(out, logits, reqs, greedy)
            step = _RankStep(self, out, header, local)
            if local is None:
                self.unreceived.append(step)
            return step

    def receive(self, step: _RankStep) -> StepResult:
        """The tokens of ``step`` from the sampling rank (steps arrive in launch order)."""
        if not self.unreceived or self.unreceived[0] is not step:
            raise RuntimeError("distributed steps must be collected in launch order")
        self.unreceived.popleft()
        h = step.header
        encoded = self.links.recv_result(result_len(h.num_logits, h.max_logprobs))
        return step_result(step.out, decode_result(encoded, h.num_logits, h.max_logprobs))

    def _plan_and_forward(self, out: SchedulerOutput, reqs: list[Request],
                          device_ids: torch.Tensor | None = None, keep_argmax: bool = False
                          ) -> tuple[StepHeader, torch.Tensor | None]:
        """Fills the inputs of ``out``, sends its plan and runs rank 0's stage; the header and,
        when rank 0 is on the last stage, the logits of the sampling rows ``reqs``.
        ``device_ids`` (the previous step's tokens, on the device) replace the host's input ids
        here and, through ``FLAG_DEVICE_INPUTS``, on every rank; ``keep_argmax``: every rank
        keeps its argmax of this step for the next one (``FLAG_KEEP_ARGMAX``)."""
        runner = self.runner
        graph = runner.graph_size_for(out)  # the same decode graph sizes on every rank
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
        """Receives the tokens still owed, stops the workers, releases the groups."""
        if self._closed.is_set():
            return
        acquired = self._lock.acquire(timeout=self.ctx.timeout)
        try:
            self._closed.set()
            self.ctx.monitor.stop()
            if self.dead is None and acquired:
                try:
                    while self.unreceived:
                        self.receive(self.unreceived[0])
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
