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
import dataclasses
import json
import logging
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

import uvicorn

from fuselm import envs
from fuselm.config import EngineConfig
from fuselm.server.api import build_app
from fuselm.server.app_state import ServerState
from fuselm.server.connection import http_protocol_with_header_timeout
from fuselm.server.options import ServerOptions
from fuselm.server.tool_parsers import TOOL_PARSERS

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


def _options(options: ServerOptions | None, kwargs: dict[str, Any]) -> ServerOptions:
    """`options`, or ServerOptions built from keyword arguments (`log_level` is accepted for
    `uvicorn_log_level`, a string for `served_model_name`)."""
    if options is not None:
        if kwargs:
            raise TypeError(f"pass either options or keyword arguments, not both: {kwargs}")
        return options
    if "log_level" in kwargs:
        kwargs["uvicorn_log_level"] = kwargs.pop("log_level")
    names = kwargs.get("served_model_name")
    if names is not None:
        kwargs["served_model_name"] = (names,) if isinstance(names, str) else tuple(names)
    return ServerOptions(**kwargs)


def uvicorn_config(app: Any, options: ServerOptions) -> uvicorn.Config:
    """uvicorn's config for `app` under `options` (TLS, root path, the header deadline)."""
    return uvicorn.Config(
        app, host=options.host, port=options.port, log_level=options.uvicorn_log_level,
        lifespan="on", timeout_graceful_shutdown=_AFTER_DRAIN_GRACE, access_log=False,
        root_path=options.root_path or "", ssl_keyfile=options.ssl_keyfile,
        ssl_certfile=options.ssl_certfile,
        http=http_protocol_with_header_timeout(options.header_timeout))


def serve_engine(engine: Any, options: ServerOptions | None = None, **kwargs: Any) -> None:
    """Serves an already built engine until SIGTERM/SIGINT (see the module docstring).
    `options` (or its fields as keyword arguments): the server's settings. `port=0` picks a
    free port; the bound address is printed as ``fuselm server listening on http://HOST:PORT``."""
    options = _options(options, kwargs)
    app = build_app(engine, options)
    server = DrainingServer(uvicorn_config(app, options), app.state.server,
                            options.shutdown_timeout)
    asyncio.run(server.serve())


def serve(engine_config: EngineConfig, options: ServerOptions | None = None,
          **kwargs: Any) -> None:
    """Builds the engine of `engine_config` and serves it (`fuselm serve`).

    The served model name defaults to the `--model` string, as in vLLM;
    `max_waiting_requests` to the scheduler's `max_waiting_requests`.
    """
    from fuselm.engine.async_engine import AsyncEngine  # the server imports the engine lazily
    from fuselm.runtime import build_engine

    options = options_for_model(_options(options, kwargs), engine_config)
    engine = AsyncEngine(build_engine(engine_config))
    serve_engine(engine, options)


def options_for_model(options: ServerOptions, engine_config: EngineConfig) -> ServerOptions:
    """`options` with the model's defaults filled in: the served name and `root` are the
    `--model` string (vLLM's rule), the waiting bound the scheduler's."""
    changes: dict[str, Any] = {}
    if engine_config.model:
        if options.served_model_name is None:
            changes["served_model_name"] = (str(engine_config.model),)
        if options.model_root is None:
            changes["model_root"] = str(engine_config.model)
    if options.max_waiting_requests is None:
        changes["max_waiting_requests"] = engine_config.scheduler.max_waiting_requests
    return dataclasses.replace(options, **changes)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags, with vLLM's names (the engine's come from
    `fuselm.cli_args.add_engine_arguments`)."""
    d = ServerOptions()
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=d.host,
                       help="address to bind (default: 127.0.0.1, this machine only)")
    group.add_argument("--port", type=int, default=d.port,
                       help="port to bind; 0 picks a free one (default: 8000)")
    group.add_argument("--api-key", default=None,
                       help="required as 'Authorization: Bearer KEY' on /v1, /v2, /tokenize, "
                            "/detokenize (default: $FUSELM_API_KEY, else no key)")
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients pass as 'model' (default: the --model string)")
    group.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                       help="seconds to drain in-flight requests after SIGTERM (default: 30)")
    group.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                       help=f"largest request body (default: {d.max_body_bytes})")
    group.add_argument("--body-timeout", type=float, default=d.body_timeout,
                       help="seconds for a request body to arrive; 408 beyond (default: 60)")
    group.add_argument("--header-timeout", type=float, default=d.header_timeout,
                       help="seconds for a request's headers to arrive; the connection is "
                            "closed beyond (default: 30)")
    group.add_argument("--allowed-hosts", type=json.loads, default=None,
                       help='JSON list of Host header names answered, "*" for any (default: '
                            "the loopback names when --host is loopback, else any)")
    for flag, help_text in (("--allowed-origins", "CORS origins"),
                            ("--allowed-methods", "CORS methods"),
                            ("--allowed-headers", "CORS headers")):
        group.add_argument(flag, type=json.loads, default=["*"],
                           help=f'JSON list of {help_text} (default: ["*"])')
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    group.add_argument("--root-path", default=None,
                       help="ASGI root path, behind a path-based proxy")
    group.add_argument("--ssl-keyfile", default=None, help="TLS key file")
    group.add_argument("--ssl-certfile", default=None, help="TLS certificate file")
    group.add_argument("--uvicorn-log-level", "--log-level", dest="uvicorn_log_level",
                       default=d.uvicorn_log_level,
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    logs = group.add_mutually_exclusive_group()
    logs.add_argument("--disable-log-requests", dest="log_requests", action="store_false",
                      default=True, help="do not log each request")
    logs.add_argument("--enable-log-requests", dest="log_requests", action="store_true",
                      help="log each request (the default)")
    group.add_argument("--max-log-len", type=int, default=None,
                       help="characters of a prompt shown in request logs (default: all)")
    group.add_argument("--disable-log-stats", dest="log_stats", action="store_false",
                       default=True, help="do not log throughput every 10 s")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let the model decide to call tools (tool_choice "auto"); needs '
                            "--tool-call-parser")
    group.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                       help="how tool calls are read from the model's text: hermes (Hermes, "
                            "Qwen) or llama3_json (Llama 3.1/3.2)")


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """ServerOptions from the parsed `fuselm serve` flags."""
    names = args.served_model_name
    return ServerOptions(
        host=args.host, port=args.port, api_key=args.api_key or envs.api_key(),
        served_model_name=tuple(names) if names else None,
        shutdown_timeout=args.shutdown_timeout, max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout, header_timeout=args.header_timeout,
        allowed_hosts=_str_tuple(args.allowed_hosts, "--allowed-hosts"),
        allowed_origins=_str_tuple(args.allowed_origins, "--allowed-origins") or (),
        allowed_methods=_str_tuple(args.allowed_methods, "--allowed-methods") or (),
        allowed_headers=_str_tuple(args.allowed_headers, "--allowed-headers") or (),
        allow_credentials=args.allow_credentials, root_path=args.root_path,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        uvicorn_log_level=args.uvicorn_log_level, log_requests=args.log_requests,
        max_log_len=args.max_log_len, log_stats=args.log_stats,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser)


def _str_tuple(value: Any, flag: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{flag} must be a JSON list of strings, got {value!r}")
    return tuple(value)


def main(args: argparse.Namespace) -> int:
    """`fuselm serve`: builds the EngineConfig and ServerOptions from the flags and serves;
    returns 0."""
    from fuselm.cli_args import engine_config_from_args

    serve(engine_config_from_args(args), options_from_args(args))
    return 0
