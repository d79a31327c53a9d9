"""The one place errors become HTTP statuses (OpenAI error JSON) and gRPC status codes."""

from __future__ import annotations

from ..errors import (
    AuthenticationError,
    CapacityError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestAbortedError,
    RequestTimeoutError,
    RequestTooLargeError,
    RouteNotFoundError,
    StageFailedError,
)

RETRY_AFTER_S = 1

# Most specific first: exception class -> (HTTP status, OpenAI error type)
HTTP = [
    (RequestTooLargeError, 413, "request_too_large"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (AuthenticationError, 401, "authentication_error"),
    (ModelNotFoundError, 404, "not_found_error"),
    (RouteNotFoundError, 404, "not_found_error"),
    (CapacityError, 429, "rate_limit_exceeded"),
    (RequestAbortedError, 499, "request_aborted"),
    (StageFailedError, 503, "service_unavailable"),
    (RequestTimeoutError, 504, "timeout"),
    (ConfigError, 500, "server_error"),
]

# exception class -> gRPC status code name
GRPC = [
    (InvalidRequestError, "INVALID_ARGUMENT"),
    (AuthenticationError, "UNAUTHENTICATED"),
    (ModelNotFoundError, "NOT_FOUND"),
    (RouteNotFoundError, "UNIMPLEMENTED"),
    (CapacityError, "RESOURCE_EXHAUSTED"),
    (RequestAbortedError, "CANCELLED"),
    (StageFailedError, "UNAVAILABLE"),
    (RequestTimeoutError, "DEADLINE_EXCEEDED"),
]


def http_status(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, client-safe message) for any exception."""
    for cls, status, err_type in HTTP:
        if isinstance(exc, cls):
            return status, err_type, str(exc)
    return 500, "server_error", "internal server error"  # no stack trace or internals leak


def grpc_status(exc: BaseException) -> tuple[str, str]:
    """(gRPC status code name, client-safe message) for any exception."""
    for cls, code in GRPC:
        if isinstance(exc, cls):
            return code, str(exc)
    return "INTERNAL", "internal server error"


def error_body(status: int, err_type: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def retry_headers(status: int) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
