"""The asynchronous engine for the server: ``generate`` yields per-token outputs, ``abort``
ends a request's stream at once, ``stats`` feeds /metrics and /health.

One step thread owns the ``LLMEngine``: nothing else calls it. The event loop only puts adds and
aborts into an inbox (a thread-safe queue) and wakes the thread; the thread drains the inbox at
the top of every step, runs ``engine.step()``, publishes a stats snapshot and hands the outputs
to the per-request asyncio queues with ``loop.call_soon_threadsafe``. So a new request, an abort,
/health and /metrics never wait for a step (which includes the GPU wait).

A bad request (InvalidRequestError, ContextLengthError from ``engine.add_request``) is rejected
by the step thread at its next drain and reported through the request's queue, so ``generate``
raises it before yielding anything, as before.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fuselm.errors import EngineDeadError, InvalidRequestError, QueueFullError
from fuselm.outputs import RequestOutput
from fuselm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fuselm.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

_Item = RequestOutput | BaseException


@dataclass(frozen=True)
class _Add:
    """Inbox command: add a request; failures go to `outputs`."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    outputs: asyncio.Queue[_Item]


@dataclass(frozen=True)
class _Abort:
    """Inbox command: end a request and free its KV blocks."""

    request_id: str


@dataclass(frozen=True)
class _Inspect:
    """Inbox command: run `fn(engine)` between two steps; its result goes to `result`."""

    fn: Callable[[Any], Any]
    result: asyncio.Future[Any]


class AsyncEngine:
    """Wraps an ``LLMEngine`` with a step thread fed by an inbox (see the module docstring)."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.model_name = engine.model_name
        self.max_waiting_requests = (max_waiting_requests if max_waiting_requests is not None
                                     else engine.config.scheduler.max_waiting_requests)
        self._queues: dict[str, asyncio.Queue[_Item]] = {}  # touched on the event loop only
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Inspect] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._snapshot: dict[str, float] = dict(engine.stats())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None

    async def start(self) -> None:
        """Starts the step thread, which delivers to the running event loop."""
        if self._thread is None and not self._stopping:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="fuselm-step", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Stops the step thread after its current step; requests still in flight end with
        EngineDeadError."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _check_admission(self) -> None:
        if self.dead is not None or self._stopping:
            raise EngineDeadError("the engine is shutting down or has failed")
        bound = self.max_waiting_requests
        if bound is None:
            return
        if self._snapshot.get("num_requests_waiting", 0) + self.num_inbox >= bound:
            raise QueueFullError(f"more than {bound} requests are waiting; retry later")

    async def generate(self, request_id: str, prompt: str | list[int],
                       sampling_params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queues the request and yields its output after every step that advances it.

        Raises InvalidRequestError/ContextLengthError before the first yield for bad input,
        QueueFullError/EngineDeadError when it can't be queued. Leaving the iterator early
        (client gone) aborts the request.
        """
        await self.start()
        if sampling_params.structured_outputs is not None:
            # compiled in a worker thread, not on the step thread (a new schema takes tens of
            # ms), which then finds it in the compiler's cache; a bad one raises here
            await asyncio.to_thread(self.engine.grammars.compile,
                                    sampling_params.structured_outputs)
        self._check_admission()
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        outputs: asyncio.Queue[_Item] = asyncio.Queue()
        # No await between the admission check and the put: a failure of the step thread
        # (which fails every queue in self._queues on this loop) can't slip in between.
        self._queues[request_id] = outputs
        self._inbox.put(_Add(request_id, prompt, sampling_params, outputs))
        self._wakeup.set()
        ended = False  # finished, failed or aborted: nothing left to abort
        try:
            while not ended:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                ended = item.finished
                yield item
        finally:
            if self._queues.get(request_id) is outputs:
                del self._queues[request_id]
            if not ended:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Ends the request's stream now; the step thread frees its KV blocks at its next
        drain (before its next step)."""
        self._inbox.put(_Abort(request_id))
        self._wakeup.set()
        outputs = self._queues.pop(request_id, None)
        if outputs is not None:
            outputs.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    @property
    def num_inbox(self) -> int:
        """Commands (adds, aborts, probes) queued for the step thread's next drain."""
        return self._inbox.qsize()

    async def inspect(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs ``fn(engine)`` on the step thread between two steps (a consistent view of the
        scheduler and the block manager, for tests and debugging) and returns its result."""
        if self._thread is None or not self._thread.is_alive():
            return fn(self.engine)  # no step thread: nothing else touches the engine
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put(_Inspect(fn, result))
        self._wakeup.set()
        return await result

    @property
    def errored(self) -> bool:
        """True once the step thread failed, or ended without being asked to stop."""
        thread = self._thread
        return self.dead is not None or (thread is not None and not thread.is_alive()
                                         and not self._stopping)

    async def check_health(self) -> None:
        """Raises EngineDeadError if the step thread failed or stopped (vLLM's face for
        /health); the state of the step thread is the only input, never a stats read."""
        if self.errored:
            raise EngineDeadError(f"the engine stopped: {self.dead or 'step thread ended'}")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def stats(self) -> dict[str, float]:
        """Engine counters for /metrics: the snapshot the step thread published after its last
        step or drain (never reads the scheduler, so it never waits for a step)."""
        return dict(self._snapshot)

    # -- the step thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()  # before the drain: a later put sets it again
                self._drain()
                if self._stopping:
                    break
                if not self.engine.has_unfinished_requests():
                    self._snapshot = dict(self.engine.stats())
                    self._wakeup.wait()
                    continue
                outputs = self.engine.step()
                self._snapshot = dict(self.engine.stats())
                if outputs:
                    self._call_on_loop(self._deliver, outputs)
        except Exception as exc:  # the engine failed: fail every request, refuse new ones
            logger.exception("engine step failed")
            self.dead = exc
        error = EngineDeadError(f"the engine stopped: {self.dead or 'shutdown'}")
        while True:  # probes left in the inbox get the error (adds get it through their queues)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Inspect):
                self._call_on_loop(_settle, cmd.result, None, error)
        self._call_on_loop(self._fail_all, error)

    def _drain(self) -> None:
        """Applies every queued add and abort, in order (step thread only)."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_id)
                continue
            if isinstance(cmd, _Inspect):
                self._run_probe(cmd)
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
            except Exception as exc:  # bad input: the caller's generate raises it
                self._call_on_loop(cmd.outputs.put_nowait, exc)

    def _run_probe(self, cmd: _Inspect) -> None:
        try:
            value = cmd.fn(self.engine)
        except Exception as exc:  # the probe's failure is its caller's, not the engine's
            self._call_on_loop(_settle, cmd.result, None, exc)
        else:
            self._call_on_loop(_settle, cmd.result, value, None)

    def _call_on_loop(self, fn: Any, *args: Any) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    # -- on the event loop ----------------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._queues.get(out.request_id)
            if target is not None:
                target.put_nowait(out)

    def _fail_all(self, error: EngineDeadError) -> None:
        for target in self._queues.values():
            target.put_nowait(error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
