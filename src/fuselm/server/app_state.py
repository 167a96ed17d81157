"""Per-app server state: the engine, names and limits, draining, in-flight count, abort tasks."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from fuselm.errors import EngineDeadError, ModelNotFoundError, QueueFullError
from fuselm.server.metrics import ServerMetrics
from fuselm.server.options import ServerOptions
from fuselm.server.prompts import PromptEncoder
from fuselm.server.request_log import RequestLogger

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share; one per app (`app.state.server`), no module globals."""

    engine: Any
    """An `AsyncEngine` (or anything with its face: generate, abort, stats, tokenizer, ...)."""
    served_model_names: list[str]
    """Names the API accepts as `model`; the first is the one reported."""
    metrics: ServerMetrics
    prompts: PromptEncoder
    """Tokenizes prompts and chat messages (off the event loop)."""
    options: ServerOptions = field(default_factory=ServerOptions)
    """The server's settings (logging, chat-template trust, ...)."""
    request_log: RequestLogger | None = None
    """Logs each request; None with --disable-log-requests."""
    max_waiting_requests: int | None = None
    """429 when the engine's waiting queue holds this many; None leaves it to the engine."""
    draining: bool = False
    """True after SIGTERM (the launcher sets it): new requests get 503."""
    num_in_flight: int = 0
    """HTTP requests admitted and not yet answered (streams count until their last byte)."""
    _background: set[asyncio.Task] = field(default_factory=set)
    _idle: asyncio.Event | None = None

    @property
    def model_name(self) -> str:
        """The served model name reported in responses."""
        return self.served_model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    def new_id(self, prefix: str) -> str:
        """A unique response id, e.g. ``cmpl-3f2a...``."""
        return f"{prefix}-{uuid.uuid4().hex}"

    def response_id(self, prefix: str, client_id: str | None) -> str:
        """The id a response reports: ``prefix-<client_id>`` where the client named one (vLLM's
        `request_id`), else a fresh one. Engine requests get ids of their own."""
        return f"{prefix}-{client_id}" if client_id else self.new_id(prefix)

    def check_model(self, name: str | None) -> None:
        """Raises ModelNotFoundError (404) for a model this server does not serve."""
        if name is not None and name not in self.served_model_names:
            raise ModelNotFoundError(
                f"the model {name!r} does not exist; this server serves "
                f"{', '.join(repr(n) for n in self.served_model_names)}")

    def check_admission(self) -> None:
        """Raises EngineDeadError (503) or QueueFullError (429) if a request can't be queued."""
        if self.draining:
            raise EngineDeadError("the server is shutting down")
        bound = self.max_waiting_requests
        if bound is not None and self.engine.stats().get("num_requests_waiting", 0) >= bound:
            raise QueueFullError(
                f"too many requests are waiting (limit {bound}); retry later")

    def abort_soon(self, request_id: str) -> None:
        """Schedules `engine.abort(request_id)` on the running loop without awaiting it, so that
        it runs even when called from a cancelled task (a disconnected client's)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._abort(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:
            logger.exception("aborting %s failed", request_id)

    def request_started(self) -> None:
        self.num_in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def request_finished(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_until_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight; False if `timeout` seconds passed first."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self.num_in_flight == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
