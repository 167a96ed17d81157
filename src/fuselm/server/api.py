"""The FastAPI app: OpenAI routes, KServe v2 generate, tokenize, health, version, metrics.

    app = build_app(engine, api_key="sk-...", served_model_name="smollm2")   # or ServerOptions
    uvicorn.run(app)            # or fuselm.server.launcher.serve(EngineConfig(...))

Errors of every kind (fuselm's typed errors, request validation, unknown routes, oversized
bodies, anything unexpected) are answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; validation errors are 400, not FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from fuselm.errors import EngineDeadError, FuselmError, InvalidRequestError
from fuselm.server.app_state import ServerState
from fuselm.server.auth import ApiKeyMiddleware
from fuselm.server.connection import HostCheckMiddleware, default_allowed_hosts
from fuselm.server.contract import check_supported
from fuselm.server.kserve import router as kserve_router
from fuselm.server.metrics import ServerMetrics
from fuselm.server.middleware import AdmissionMiddleware, BodySizeLimitMiddleware
from fuselm.server.options import ServerOptions
from fuselm.server.prompts import PromptEncoder, check_token_ids
from fuselm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    error_body,
)
from fuselm.server.request_log import RequestLogger, start_stats_logging
from fuselm.server.serving import error_json, run_until_disconnect
from fuselm.server.serving_chat import create_chat_completion
from fuselm.server.serving_completion import (
    create_completion,
    kserve_generate,
    kserve_generate_stream,
)
from fuselm.server.serving_structured import template_messages, template_tools

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 408: "timeout_error",
                 429: "rate_limit_error", 503: "service_unavailable"}

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def fuselm_version() -> str:
    """The installed fuselm version."""
    try:
        return version("fuselm")
    except PackageNotFoundError:
        return "0.0.0+unknown"


# -- routes --------------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine's step thread runs, 503 once it failed or stopped."""
    try:
        await _state(request).engine.check_health()
    except EngineDeadError as exc:
        return JSONResponse(error_body(f"the engine failed: {exc}", "service_unavailable"),
                            status_code=503)
    return Response(status_code=200)


@router.get("/version", response_model=VersionResponse)
async def show_version() -> VersionResponse:
    return VersionResponse(version=fuselm_version())


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    return ModelList(data=[_model_card(state, name) for name in state.served_model_names])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    state = _state(request)
    state.check_model(model)
    return _model_card(state, model)


def _model_card(state: ServerState, name: str) -> ModelCard:
    # vLLM's meaning: `id` is the served name, `root` the model it was loaded from
    root = state.options.model_root or str(state.engine.model_name)
    return ModelCard(id=name, root=root, max_model_len=state.max_model_len)


@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """OpenAI completions (JSON, or SSE when `stream`)."""
    return await run_until_disconnect(request, create_completion(_state(request), body))


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completions (JSON, or SSE when `stream`)."""
    return await run_until_disconnect(request, create_chat_completion(_state(request), body))


@router.post("/v2/models/{model}/generate", responses=ERROR_RESPONSES)
async def generate(model: str, body: GenerateRequest, request: Request) -> Response:
    """KServe v2 generate extension: `text_input` -> `text_output`."""
    return await run_until_disconnect(request, kserve_generate(_state(request), model, body))


@router.post("/v2/models/{model}/generate_stream", responses=ERROR_RESPONSES)
async def generate_stream(model: str, body: GenerateRequest, request: Request) -> Response:
    """KServe v2 generate extension, streamed as SSE."""
    return await run_until_disconnect(request,
                                      kserve_generate_stream(_state(request), model, body))


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of `prompt`, or of `messages` rendered with the chat template."""
    state = _state(request)
    state.check_model(body.model)
    check_supported(body)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise InvalidRequestError("messages is empty", param="messages")
        template_kwargs = dict(body.chat_template_kwargs or {})
        if body.tools is not None:
            template_kwargs["tools"] = template_tools(body.tools)
        _, ids = await state.prompts.chat_prompt(
            template_messages(body.messages), body.add_generation_prompt,
            add_special_tokens=bool(body.add_special_tokens),
            template_kwargs=template_kwargs or None)
    else:
        if body.tools is not None:
            raise InvalidRequestError("tools need messages (the chat template)", param="tools")
        text = body.prompt or ""
        state.prompts.check_length(len(text), "prompt")
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await asyncio.to_thread(state.prompts.encode, text, add)
    strs = ([state.tokenizer.token_text(t) or "" for t in ids] if body.return_token_strs
            else None)
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Text of token ids."""
    state = _state(request)
    state.check_model(body.model)
    ids = check_token_ids(body.tokens, state.tokenizer.vocab_size, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(ids))


# -- errors --------------------------------------------------------------------------------------


async def _fuselm_error(_: Request, exc: FuselmError) -> JSONResponse:
    return JSONResponse(error_json(exc), status_code=exc.status_code)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = None if first.get("type") == "json_invalid" else ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if first.get("type") == "extra_forbidden":
        message = (f"unrecognized request field {param!r}: fuselm implements OpenAI's fields "
                   "and vLLM's documented extensions (see the server README)")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {413: "request_too_large", 408: "request_timeout"}.get(exc.status_code)
    error_type = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
    return JSONResponse(error_body(str(exc.detail), error_type, code=code),
                        status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)


# -- the app -------------------------------------------------------------------------------------


def build_app(engine: Any, options: ServerOptions | None = None, *, start_engine: bool = True,
              **kwargs: Any) -> FastAPI:
    """The server's FastAPI app around `engine` (an `AsyncEngine` or anything with its face).

    `options` (or its fields as keyword arguments, e.g. ``api_key="sk-..."``): the server's
    settings (`ServerOptions`): the API key, served names (default: `engine.model_name`), the
    waiting bound (429), body size (413) and time (408) limits, allowed Host names, CORS.
    `start_engine`: start the engine's loop on app startup and shut it down on app shutdown.
    The app's `ServerState` is `app.state.server` (setting its `draining` starts a drain).
    """
    if options is None:
        names = kwargs.get("served_model_name")
        if isinstance(names, str):
            kwargs["served_model_name"] = (names,)
        elif names is not None:
            kwargs["served_model_name"] = tuple(names)
        options = ServerOptions(**kwargs)
    elif kwargs:
        raise TypeError(f"pass either options or keyword arguments, not both: {kwargs}")
    names = list(options.served_model_name or [str(engine.model_name)])
    state = ServerState(engine=engine, served_model_names=names,
                        metrics=ServerMetrics(engine, names[0]),
                        prompts=PromptEncoder(engine.tokenizer, int(engine.max_model_len)),
                        max_waiting_requests=options.max_waiting_requests, options=options,
                        request_log=(RequestLogger(options.max_log_len) if options.log_requests
                                     else None))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            await engine.start()
        stats_task = (start_stats_logging(engine.stats, options.log_stats_interval)
                      if options.log_stats else None)
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            if start_engine:
                await engine.shutdown()

    app = FastAPI(title="fuselm", version=fuselm_version(), lifespan=lifespan,
                  description="OpenAI-compatible server of the fuselm engine")
    app.state.server = state
    app.include_router(router)
    app.include_router(kserve_router)
    app.add_exception_handler(FuselmError, _fuselm_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    _add_middleware(app, state, options)
    return app


def _add_middleware(app: FastAPI, state: ServerState, options: ServerOptions) -> None:
    # Added last = outermost: the Host check, CORS (a preflight is answered before auth),
    # admission (503 while draining), auth, then the body's limits.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=options.max_body_bytes,
                       body_timeout=options.body_timeout)
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)
    app.add_middleware(AdmissionMiddleware, state=state)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=list(options.allowed_methods),
                           allow_headers=list(options.allowed_headers),
                           allow_credentials=options.allow_credentials)
    hosts = options.allowed_hosts
    if hosts is None:
        hosts = default_allowed_hosts(options.host)
    if hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=list(hosts))
