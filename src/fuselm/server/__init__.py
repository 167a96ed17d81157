"""The OpenAI-compatible HTTP server (see README.md): `build_app(engine)` and `serve(config)`."""

from fuselm.server.api import build_app
from fuselm.server.launcher import serve, serve_engine

__all__ = ["build_app", "serve", "serve_engine"]
