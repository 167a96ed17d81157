"""ASGI middleware: admission while draining, in-flight counting, the body's size and time limits.

Pure ASGI (not `BaseHTTPMiddleware`), so that streamed responses and client disconnects pass
through untouched.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fuselm.server.app_state import ServerState
from fuselm.server.protocol import error_body

# Paths still served while draining (a scrape should see the drain happen; a liveness probe
# must not get a draining server killed).
ALWAYS_OPEN = frozenset({"/metrics", "/v2/health/live"})


class AdmissionMiddleware:
    """503 for new requests while draining or after an engine failure; counts the rest as in
    flight until their response (stream included) is complete."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, path = self.state, scope.get("path", "")
        if state.draining and path not in ALWAYS_OPEN:
            body = error_body("the server is shutting down; retry on another instance",
                              "service_unavailable", code="shutting_down")
            await JSONResponse(body, status_code=503, headers={"Connection": "close"})(
                scope, receive, send)
            return
        state.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            state.request_finished()


class BodyTooLarge(HTTPException):
    """The request body is over the limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyTimeout(HTTPException):
    """The request body did not arrive in time (HTTP 408)."""

    def __init__(self, timeout: float) -> None:
        # the rest of the body may still come: the connection cannot carry another request
        super().__init__(408, f"the request body did not arrive within {timeout:g} s",
                         headers={"Connection": "close"})


class BodySizeLimitMiddleware:
    """413 for bodies over `max_bytes`, by Content-Length or by counting what arrives; 408 for
    a body not complete `body_timeout` seconds after the app first reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float = 60.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    await _reject(scope, receive, send, 400, "invalid Content-Length header")
                    return
                if int(value) > self.max_bytes:
                    await _reject(scope, receive, send, 413, BodyTooLarge(self.max_bytes).detail)
                    return
        received = 0
        deadline: float | None = None
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, body_done
            if body_done:  # later reads wait for the disconnect: no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    code = "request_too_large" if status == 413 else None
    body = error_body(message, "invalid_request_error", code=code)
    await JSONResponse(body, status_code=status, headers={"Connection": "close"})(
        scope, receive, send)
