"""Connection limits that uvicorn lacks: a deadline for a request's headers (a client that
sends half a request line and stalls would otherwise hold its connection forever) and the Host
header check against DNS rebinding.

The body's deadline is `RequestTimeoutMiddleware` in `middleware.py`; this module owns what
happens before the app sees a request.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fuselm.server.protocol import error_body

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(bind_host: str) -> list[str] | None:
    """Host names a server bound to `bind_host` answers by default: the loopback names when it
    listens on loopback only (a page that rebinds its own name to 127.0.0.1 is refused), None
    (any) when it listens on other interfaces."""
    return list(LOOPBACK_HOSTS) if bind_host in LOOPBACK_HOSTS else None


def _host_name(value: str) -> str:
    """The name of a Host header value, without its port (`[::1]:8000` -> `::1`)."""
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheckMiddleware:
    """400 (OpenAI-shaped) for a request whose Host header names none of `allowed_hosts`."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        host = ""
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1")
                break
        if _host_name(host).lower() in self.allowed:
            await self.app(scope, receive, send)
            return
        body = error_body(f"the Host header {host!r} is not allowed by this server "
                          "(--allowed-hosts)", "invalid_request_error", code="invalid_host")
        await JSONResponse(body, status_code=400)(scope, receive, send)


def http_protocol_with_header_timeout(timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools where installed, else h11), closing a connection
    whose request headers are not complete `timeout` seconds after their first byte (or after
    the connection opened)."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderDeadlineProtocol(base):  # type: ignore[valid-type, misc]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_headers():
                self._arm()  # armed once per request: trickled bytes do not extend it
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
