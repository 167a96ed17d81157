"""The OpenAI-compatible HTTP server (see README.md): `build_app(engine, options)` and
`serve(config, options)`."""

from fuselm.server.api import build_app
from fuselm.server.launcher import serve, serve_engine
from fuselm.server.options import ServerOptions

__all__ = ["ServerOptions", "build_app", "serve", "serve_engine"]
