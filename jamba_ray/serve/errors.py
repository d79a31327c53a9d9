"""The one place errors become HTTP statuses (OpenAI error JSON) and gRPC status codes."""

from __future__ import annotations

from ..errors import (
    CapacityError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestAbortedError,
    StageFailedError,
)


class HTTPError(Exception):
    """An error with its HTTP status and OpenAI error type, raised by the front itself."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


RETRY_AFTER_S = 1

# exception class -> (HTTP status, OpenAI error type, gRPC status code name)
_TABLE = [
    (InvalidRequestError, 400, "invalid_request_error", "INVALID_ARGUMENT"),
    (ModelNotFoundError, 404, "not_found_error", "NOT_FOUND"),
    (CapacityError, 429, "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    (StageFailedError, 503, "service_unavailable", "UNAVAILABLE"),
    (RequestAbortedError, 499, "request_aborted", "CANCELLED"),
    (ConfigError, 500, "server_error", "INTERNAL"),
]


def classify(exc: BaseException) -> tuple[int, str, str, str]:
    """(HTTP status, error type, gRPC code name, client-safe message) for any exception."""
    if isinstance(exc, HTTPError):
        grpc = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}.get(exc.status, "INTERNAL")
        return exc.status, exc.err_type, grpc, exc.message
    for cls, status, err_type, grpc in _TABLE:
        if isinstance(exc, cls):
            return status, err_type, grpc, str(exc)
    # Anything unexpected: no stack trace or internals reach the client.
    return 500, "server_error", "INTERNAL", "internal server error"


def error_body(status: int, err_type: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def retry_headers(status: int) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
