"""Async scheduling for a single process: step N+1 is queued on the GPU before the host reads
step N's tokens, so the host's bookkeeping overlaps the GPU instead of idling it.

Only steady decode is pipelined: every sequence of the pending step decodes one token, nothing
waits for admission, no sequence can end by length in the pending step, and no sampling parameter
reads the token history (penalties) or asks for logprobs. The successor's input tokens are the
pending step's samples, copied on the device. A sequence that stops (EOS, stop string, abort) in
the pending step has its successor's token discarded by ``Scheduler.update`` (it skips finished
sequences); its KV write lands in blocks that the stream order keeps from any later owner.
"""

from __future__ import annotations

from collections.abc import Callable

from fuselm.engine.model_runner import ModelRunner, PendingStep, StepResult
from fuselm.engine.request import Request
from fuselm.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput


def _pipelinable(req: Request, max_model_len: int) -> bool:
    p = req.sampling_params
    return (not req.is_finished and p.logprobs is None and not p.uses_penalties
            and len(req.output_token_ids) + 1 < req.max_tokens
            and req.num_computed_tokens + 2 <= max_model_len)


def pipelined_successor(out: SchedulerOutput, scheduler: Scheduler,
                        max_model_len: int) -> SchedulerOutput | None:
    """The next decode step of the same sequences, one token ahead of the host, or None when
    the pending step ``out`` cannot be followed blindly (see the module docstring)."""
    if scheduler.waiting or not out.sequences or not all(
            s.num_new_tokens == 1 and s.sample for s in out.sequences):
        return None
    reqs = [s.request for s in out.sequences]
    if not all(_pipelinable(r, max_model_len) for r in reqs):
        return None
    if not all(scheduler.block_manager.allocate(r, 2) for r in reqs):
        return None  # blocks already taken stay with their sequences: harmless
    return SchedulerOutput([ScheduledSequence(r, 1, True, ahead=1) for r in reqs])


class AsyncLocalExecutor:
    """One step ahead on the device while the host processes the previous one.

    ``launch(out, input_ids=None) -> PendingStep`` queues a step (default: the runner's, one
    process; rank 0 of tensor parallelism passes its own, which also sends the plan).
    ``greedy_only``: follow only plain greedy steps (every TP rank recomputes the argmax itself).
    """

    def __init__(self, runner: ModelRunner, max_model_len: int,
                 launch: Callable[..., PendingStep] | None = None,
                 greedy_only: bool = False) -> None:
        self.runner, self.max_model_len = runner, max_model_len
        self.launch = launch or runner.launch
        self.greedy_only = greedy_only
        self.pending: PendingStep | None = None
        self.num_pipelined_steps = 0

    def step(self, scheduler: Scheduler) -> tuple[SchedulerOutput, StepResult | None]:
        """Returns the oldest launched step's schedule and tokens (None: nothing to run)."""
        if self.pending is None:
            out = scheduler.schedule()
            if out.is_empty:
                return out, None
            self.pending = self.launch(out)
        prev = self.pending
        successor = None
        if prev.greedy or not self.greedy_only:
            successor = pipelined_successor(prev.out, scheduler, self.max_model_len)
        self.pending = None
        if successor is not None:
            self.pending = self.launch(successor, input_ids=prev.result.token_ids)
            self.num_pipelined_steps += 1
        return prev.out, self.runner.finish(prev)

    def shutdown(self) -> None:
        """Drops the step in flight (its sequences are being aborted with the engine)."""
        self.pending = None
