"""Typed exceptions. The server maps each to an OpenAI-style error with a 4xx status."""


class FuselmError(Exception):
    """Base class of every error fuselm raises on purpose."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None
    """OpenAI-style `code` of the error body (None: none)."""


class ModelNotFoundError(FuselmError):
    """A model path or file that does not exist."""

    status_code = 404
    error_type = "not_found_error"
    code = "model_not_found"


class ConfigError(FuselmError, ValueError):
    """A flag or config value that is invalid, or cannot work with this model or on this
    machine; the message names the flag."""


class UnsupportedModelError(FuselmError):
    """An architecture or checkpoint layout fuselm cannot run."""


class CheckpointError(FuselmError):
    """A checkpoint file that is truncated, corrupt or inconsistent; the message names it."""


class UnsupportedQuantizationError(FuselmError):
    """A quantization type fuselm cannot load."""


class InvalidRequestError(FuselmError):
    """Invalid sampling parameters or prompt (for example, too long for the context)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens exceed the model's context length."""

    code = "context_length_exceeded"


class QueueFullError(FuselmError):
    """The waiting queue is over its bound."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class EngineDeadError(FuselmError):
    """The engine failed or is shutting down."""

    status_code = 503
    error_type = "service_unavailable"
    code = "engine_unavailable"
