"""The asynchronous engine for the server: ``generate`` yields per-token outputs, ``abort``
frees a request's blocks at once, ``stats`` feeds the metrics.

Model steps run in a worker thread so the event loop stays responsive. Adds and aborts from the
event loop are queued and applied between steps, so the engine is only touched by that thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from fuselm.engine.engine import LLMEngine
from fuselm.errors import EngineDeadError, QueueFullError
from fuselm.outputs import RequestOutput
from fuselm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Wraps an ``LLMEngine`` with a background step loop on the running event loop."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.model_name = engine.model_name
        self.max_waiting_requests = (max_waiting_requests if max_waiting_requests is not None
                                     else engine.config.scheduler.max_waiting_requests)
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._lock = threading.Lock()  # guards the engine between the loop and the step thread
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.dead: BaseException | None = None

    async def start(self) -> None:
        """Starts the step loop on the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run())

    async def shutdown(self) -> None:
        """Stops the step loop; requests still in flight end with EngineDeadError."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _check_admission(self) -> None:
        if self.dead is not None or self._stopping:
            raise EngineDeadError("the engine is shutting down or has failed")
        bound = self.max_waiting_requests
        if bound is not None and self.stats()["num_requests_waiting"] >= bound:
            raise QueueFullError(f"more than {bound} requests are waiting; retry later")

    async def generate(self, request_id: str, prompt: str | list[int],
                       sampling_params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Adds the request and yields its output after every step that advances it.

        Raises InvalidRequestError/ContextLengthError before the first yield for bad input.
        Leaving the iterator early (client gone) aborts the request.
        """
        await self.start()
        self._check_admission()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, sampling_params)
        self._queues[request_id] = queue
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Ends the request and frees its KV blocks now."""
        with self._lock:
            self.engine.abort_request(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    def stats(self) -> dict[str, float]:
        """Engine counters for /metrics."""
        return self.engine.stats()

    def _locked_step(self) -> list[RequestOutput]:
        with self._lock:
            return self.engine.step()

    async def _run(self) -> None:
        assert self._wakeup is not None
        try:
            while not self._stopping:
                if not self.engine.has_unfinished_requests():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                outputs = await asyncio.to_thread(self._locked_step)
                for out in outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except Exception as exc:  # the engine failed: fail every request, refuse new ones
            logger.exception("engine step failed")
            self.dead = exc
        error = EngineDeadError(f"the engine stopped: {self.dead or 'shutdown'}")
        for queue in self._queues.values():
            queue.put_nowait(error)
