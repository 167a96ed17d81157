"""Run the server: build the engine, serve the app with uvicorn, drain on SIGTERM.

    serve(EngineConfig(model="path/to/model.gguf"), port=8000, api_key="sk-...")
    fuselm serve [MODEL] --port 8000 --api-key sk-...   (cli.py: add_serve_arguments + main)

On SIGTERM (or SIGINT) the server keeps listening but answers every new request with 503,
waits up to `shutdown_timeout` seconds for the requests in flight (streams included) to finish,
then stops uvicorn and the engine and returns normally (exit status 0). Requests still running
at the timeout end with the engine's shutdown error (503 body, or an error event in a stream).
A second signal stops the engine at once (requests in flight end with 503, streams with an
error event and [DONE]); a third exits without waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

import uvicorn

from fuselm import envs
from fuselm.config import EngineConfig
from fuselm.server.api import DEFAULT_MAX_BODY_BYTES, build_app
from fuselm.server.app_state import ServerState

logger = logging.getLogger(__name__)

# Seconds uvicorn waits for connections after the drain, before cancelling what is left.
_AFTER_DRAIN_GRACE = 2.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signals start a drain instead of closing the listener.

    uvicorn's own handler stops accepting connections at once (clients would see connection
    refused, not 503) and re-raises the signal at exit (status -15, not 0); this one does
    neither.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._num_signals = 0
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            # One parseable line (tests and scripts read the port when asked for port 0).
            print(f"fuselm server listening on http://{host}:{port}", flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._num_signals += 1
        if self._loop is None or self._num_signals > 2:
            self.should_exit = True
            self.force_exit = True
            return
        if self._num_signals == 2:
            logger.warning("signal %d again: stopping the engine now; requests in flight end "
                           "with 503 (a third signal exits at once)", sig)
            self._loop.call_soon_threadsafe(self._start_task, self.stop_now)
            return
        logger.info("signal %d: draining (up to %.0f s), new requests get 503", sig,
                    self.shutdown_timeout)
        self.state.draining = True
        self._loop.call_soon_threadsafe(self._start_task, self.drain)

    def _start_task(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(fn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop_now(self) -> None:
        """Ends the requests in flight with the engine's shutdown error (503 bodies, error
        events and [DONE] in streams), lets them flush, then exits."""
        self.state.draining = True
        await self.state.engine.shutdown()
        await self.state.wait_until_idle(_AFTER_DRAIN_GRACE)
        self.should_exit = True

    async def drain(self) -> None:
        """Stops admitting, waits for in-flight requests (up to the timeout), then exits."""
        self.state.draining = True
        if not await self.state.wait_until_idle(self.shutdown_timeout):
            logger.warning("%d requests still in flight after %.1f s; stopping the engine",
                           self.state.num_in_flight, self.shutdown_timeout)
            # The engine ends what is left with EngineDeadError: plain requests get a 503 body,
            # streams an error event and [DONE], instead of a cut connection.
            await self.state.engine.shutdown()
            await self.state.wait_until_idle(_AFTER_DRAIN_GRACE)
        self.should_exit = True


def serve_engine(engine: Any, *, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, served_model_name: str | list[str] | None = None,
                 shutdown_timeout: float = 30.0, max_waiting_requests: int | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Serves an already built engine until SIGTERM/SIGINT (see the module docstring).
    `port=0` picks a free port; the bound address is printed as
    ``fuselm server listening on http://HOST:PORT``."""
    app = build_app(engine, api_key=api_key, served_model_name=served_model_name,
                    max_waiting_requests=max_waiting_requests, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=_AFTER_DRAIN_GRACE, access_log=False)
    server = DrainingServer(config, app.state.server, shutdown_timeout)
    asyncio.run(server.serve())


def serve(engine_config: EngineConfig, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, served_model_name: str | list[str] | None = None,
          shutdown_timeout: float = 30.0, max_waiting_requests: int | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Builds the engine of `engine_config` and serves it (`fuselm serve`).

    `max_waiting_requests` defaults to the scheduler's `max_waiting_requests`.
    """
    from fuselm.engine.async_engine import AsyncEngine  # the server imports the engine lazily
    from fuselm.runtime import build_engine

    engine = AsyncEngine(build_engine(engine_config))
    if max_waiting_requests is None:
        max_waiting_requests = engine_config.scheduler.max_waiting_requests
    serve_engine(engine, host=host, port=port, api_key=api_key,
                 served_model_name=served_model_name, shutdown_timeout=shutdown_timeout,
                 max_waiting_requests=max_waiting_requests, max_body_bytes=max_body_bytes,
                 log_level=log_level)



def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags (the engine's come from `fuselm.cli_args.add_engine_arguments`)."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1, this machine only)")
    group.add_argument("--port", type=int, default=8000,
                       help="port to bind; 0 picks a free one (default: 8000)")
    group.add_argument("--api-key", default=None,
                       help="required as 'Authorization: Bearer KEY' on /v1, /v2, /tokenize, "
                            "/detokenize (default: $FUSELM_API_KEY, else no key)")
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients pass as 'model' (default: the model's name)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds to drain in-flight requests after SIGTERM (default: 30)")
    group.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES})")
    group.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])


def main(args: argparse.Namespace) -> int:
    """`fuselm serve`: builds the EngineConfig from the flags and serves; returns 0."""
    from fuselm.cli_args import engine_config_from_args

    api_key = args.api_key or envs.api_key()
    serve(engine_config_from_args(args), host=args.host, port=args.port, api_key=api_key,
          served_model_name=args.served_model_name, shutdown_timeout=args.shutdown_timeout,
          max_body_bytes=args.max_body_bytes, log_level=args.log_level)
    return 0
