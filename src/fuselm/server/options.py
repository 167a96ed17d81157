"""`ServerOptions`: every setting of the HTTP server (not of the engine), validated once.

`fuselm serve` fills it from vLLM-named flags (`launcher.add_serve_arguments`); `serve_engine`
and `build_app` read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuselm.server.tool_parsers import TOOL_PARSERS


@dataclass(frozen=True)
class ServerOptions:
    """The server's settings; each raises ValueError naming its flag when out of range."""

    host: str = "127.0.0.1"
    """Address to bind (this machine only by default)."""
    port: int = 8000
    """Port to bind; 0 picks a free one."""
    api_key: str | None = None
    """Required as 'Authorization: Bearer KEY' on /v1, /v2, /tokenize, /detokenize."""
    served_model_name: tuple[str, ...] | None = None
    """Names clients pass as `model`; None: the --model string, as vLLM does."""
    model_root: str | None = None
    """The model path reported as `root` by /v1/models; None: the engine's model name."""
    shutdown_timeout: float = 30.0
    """Seconds to drain in-flight requests after SIGTERM."""
    max_waiting_requests: int | None = None
    """429 once this many requests wait; None: the scheduler's bound."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body (413 beyond)."""
    body_timeout: float = 60.0
    """Seconds for a request body to arrive once its headers did (408 beyond)."""
    header_timeout: float = 30.0
    """Seconds for a request's headers to arrive (the connection is closed beyond)."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host header names answered; None: the loopback names when bound to loopback, else any."""
    allowed_origins: tuple[str, ...] = ("*",)
    """CORS origins (vLLM's default: any)."""
    allowed_methods: tuple[str, ...] = ("*",)
    """CORS methods."""
    allowed_headers: tuple[str, ...] = ("*",)
    """CORS headers."""
    allow_credentials: bool = False
    """CORS: allow credentials."""
    root_path: str | None = None
    """ASGI root path, for a server behind a path-based proxy."""
    ssl_keyfile: str | None = None
    """TLS key file (with ssl_certfile: HTTPS)."""
    ssl_certfile: str | None = None
    """TLS certificate file."""
    uvicorn_log_level: str = "info"
    """uvicorn's log level."""
    log_requests: bool = True
    """Log each request (--disable-log-requests turns it off)."""
    max_log_len: int | None = None
    """Characters of a prompt shown in request logs; None: all of it."""
    log_stats: bool = True
    """Log throughput and queue state every 10 s (--disable-log-stats turns it off)."""
    enable_auto_tool_choice: bool = False
    """Let the model decide to call tools (tool_choice "auto"); needs tool_call_parser."""
    tool_call_parser: str | None = None
    """How calls are read from the model's text: hermes (Hermes, Qwen) or llama3_json."""
    log_stats_interval: float = 10.0
    """Seconds between two throughput lines (vLLM's 10 s)."""

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "--port", "must be in [0, 65535]"),
            (self.shutdown_timeout >= 0, "--shutdown-timeout", "must be >= 0"),
            (self.max_body_bytes >= 1, "--max-body-bytes", "must be >= 1"),
            (self.body_timeout > 0, "--body-timeout", "must be > 0"),
            (self.header_timeout > 0, "--header-timeout", "must be > 0"),
            (self.tool_call_parser in (None, *TOOL_PARSERS), "--tool-call-parser",
             f"must be one of {', '.join(TOOL_PARSERS)}"),
            (not self.enable_auto_tool_choice or self.tool_call_parser is not None,
             "--enable-auto-tool-choice", "needs --tool-call-parser"),
            (self.log_stats_interval > 0, "log_stats_interval", "must be > 0"),
            (self.max_waiting_requests is None or self.max_waiting_requests >= 1,
             "--max-waiting-requests", "must be >= 1"),
            (self.max_log_len is None or self.max_log_len >= 0, "--max-log-len",
             "must be >= 0"),
            ((self.ssl_keyfile is None) == (self.ssl_certfile is None),
             "--ssl-keyfile/--ssl-certfile", "must be given together"),
            (self.uvicorn_log_level in ("critical", "error", "warning", "info", "debug", "trace"),
             "--uvicorn-log-level", "must be critical, error, warning, info, debug or trace"),
        ]
        for ok, flag, message in checks:
            if not ok:
                raise ValueError(f"{flag} {message}")
