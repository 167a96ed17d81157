"""KServe v2 (Open Inference Protocol) health, readiness and model metadata routes; the v2
generate extension's handlers are in `serving_completion.py`.

Liveness answers while the process runs (also while draining, so that an orchestrator does not
kill a server finishing its requests); readiness while the engine runs and the server admits
requests. Errors keep the server's OpenAI shape.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fuselm.errors import EngineDeadError
from fuselm.server.app_state import ServerState


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """`GET /v2/models/{name}`: the generate extension's text tensors."""

    name: str
    versions: list[str] = []
    platform: str = "fuselm"
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _ready(state: ServerState) -> bool:
    if state.draining:
        return False
    try:
        await state.engine.check_health()
    except EngineDeadError:
        return False
    return True


@router.get("/v2/health/live")
async def live() -> JSONResponse:
    """200 while the server process answers."""
    return JSONResponse({"live": True})


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    """200 while requests are admitted and the engine runs, 503 otherwise."""
    is_ready = await _ready(_state(request))
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/v2/models/{model}", response_model=ModelMetadata)
async def model_metadata(model: str, request: Request) -> ModelMetadata:
    """The model's name and its text input and output tensors (404 for another model)."""
    _state(request).check_model(model)
    return ModelMetadata(name=model,
                         inputs=[TensorMetadata(name="text_input", datatype="BYTES", shape=[1])],
                         outputs=[TensorMetadata(name="text_output", datatype="BYTES",
                                                 shape=[-1])])


@router.get("/v2/models/{model}/ready")
async def model_ready(model: str, request: Request) -> JSONResponse:
    """200 with ``{"name", "ready": true}`` while the model can serve, 503 otherwise."""
    state = _state(request)
    state.check_model(model)
    is_ready = await _ready(state)
    return JSONResponse({"name": model, "ready": is_ready},
                        status_code=200 if is_ready else 503)
