"""API-key authentication for the inference routes (`/v1/*`, `/v2/*`, `/tokenize`, `/detokenize`).

Clients send ``Authorization: Bearer <key>`` (what the OpenAI clients do). Keys are compared in
constant time. `/health`, `/v2/health/*`, `/metrics`, `/version` and the docs stay open.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fuselm.server.protocol import error_body

PROTECTED_PREFIXES = ("/v1/", "/v2/")
PROTECTED_PATHS = frozenset({"/v1", "/v2", "/tokenize", "/detokenize"})


OPEN_PREFIXES = ("/v2/health/",)
"""KServe's health probes stay open, like /health (orchestrators send no key)."""


def needs_auth(path: str) -> bool:
    """True for the routes that require the API key."""
    if path.startswith(OPEN_PREFIXES):
        return False
    return path in PROTECTED_PATHS or path.startswith(PROTECTED_PREFIXES)


def key_matches(authorization: str | None, api_key: str) -> bool:
    """True when an ``Authorization`` header value carries `api_key` as a bearer token."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class ApiKeyMiddleware:
    """Answers 401 (OpenAI-shaped) on protected routes without the right bearer key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" \
                or not needs_auth(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        if key_matches(authorization, self.api_key):
            await self.app(scope, receive, send)
            return
        body = error_body("invalid or missing API key; send 'Authorization: Bearer <key>'",
                          "authentication_error", code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
