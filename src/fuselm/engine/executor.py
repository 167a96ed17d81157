"""How the engine loop runs a schedule: the ``Executor`` protocol and the one-process executor.

``execute(out, follows=None)`` launches one ``SchedulerOutput`` and returns a ``PendingStep`` at
once; ``PendingStep.result()`` waits for that step only. The loop in ``LLMEngine.step`` owns the
order of things: how many steps are in flight (up to ``max_in_flight``: the pipeline stages'
micro-batches) and whether the next decode step is launched before the host has read the
current one's tokens (``follows``: the pending step whose device tokens are the next inputs;
allowed where ``can_follow`` says so). The distributed executor (rank 0 of several) implements
the same protocol in ``fuselm.distributed.executor``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fuselm.engine.model_runner import DeferredSampling, LaunchedStep, ModelRunner, StepResult
from fuselm.engine.scheduler import SchedulerOutput


class PendingStep(Protocol):
    """A launched step."""

    out: SchedulerOutput

    @property
    def device_tokens(self) -> torch.Tensor:
        """Its sampled token ids on the device (inputs of a step that follows it)."""
        ...

    def result(self) -> StepResult:
        """Waits for this step and returns its tokens on the host."""
        ...

    def finish_sampling(self) -> None:
        """Queues its sampling if that was deferred (``execute(..., defer_sampling=True)``)."""
        ...


class Executor(Protocol):
    """Runs schedules on the model: one process, or every rank of a distributed engine."""

    max_in_flight: int
    """Steps that may be launched before the oldest one's result is read."""
    can_defer_sampling: bool
    """Whether ``execute`` can queue a forward now and its sampling later."""
    supports_prompt_logprobs: bool
    """Whether its steps return prompt logprobs (``SamplingParams.prompt_logprobs``)."""

    def execute(self, out: SchedulerOutput, follows: PendingStep | None = None,
                defer_sampling: bool = False) -> PendingStep:
        """Launches ``out``; with ``follows``, its input ids are that step's device tokens;
        with ``defer_sampling``, its sampling waits for ``PendingStep.finish_sampling``."""
        ...

    def can_follow(self, pending: PendingStep) -> bool:
        """True when a step may take ``pending``'s tokens before the host has read them."""
        ...

    def shutdown(self) -> None:
        """Releases what the executor holds (graphs, process groups)."""
        ...


class LocalExecutor:
    """A single process: the runner launches each schedule on this device."""

    max_in_flight = 1
    can_defer_sampling = True
    supports_prompt_logprobs = True

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, out: SchedulerOutput, follows: PendingStep | None = None,
                defer_sampling: bool = False) -> LaunchedStep | DeferredSampling:
        """Queues the step on the device without waiting for it."""
        return self.runner.launch(out, None if follows is None else follows.device_tokens,
                                  defer_sampling)

    def can_follow(self, pending: PendingStep) -> bool:
        """Always: sampling runs in this process, so any sampled tokens can feed the next step."""
        return True

    def shutdown(self) -> None:
        """Nothing to release."""
