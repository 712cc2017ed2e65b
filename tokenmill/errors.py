"""Errors a user can cause. Every one is a ValueError subclass with a one-line message."""
from __future__ import annotations

from typing import Optional


class TokenmillError(ValueError):
    """Base class of user-facing errors (bad input, bad config, bad files)."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(TokenmillError):
    """A request's prompt or sampling parameters are invalid."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus max_tokens where required) does not fit in max_model_len."""

    http_status = 400

    def __init__(self, message: str, param: Optional[str] = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ConfigError(TokenmillError):
    """An engine setting is invalid or cannot fit on the device."""


class ModelLoadError(TokenmillError):
    """A model cannot be loaded: missing or corrupt files, unknown architecture."""


class EngineOverloadedError(TokenmillError):
    """The waiting queue is full (HTTP 429)."""

    http_status = 429
    error_type = "rate_limit_error"


# the error text of a request the slo policy refused (--slo-reject); the server answers it with HTTP 429
SLO_REJECTED_MESSAGE = "rejected: the request can no longer meet its latency target"


class EngineDeadError(RuntimeError):
    """The engine loop has died; no request can be served."""
