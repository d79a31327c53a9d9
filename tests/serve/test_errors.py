"""One table per front: every error class has its HTTP status and gRPC code; nothing else leaks."""

from __future__ import annotations

import pytest

from jamba_ray import errors
from jamba_ray.serve.errors import error_body, grpc_status, http_status, retry_headers

CASES = [
    (errors.InvalidRequestError("bad top_p"), 400, "invalid_request_error", "INVALID_ARGUMENT"),
    (errors.RequestTooLargeError("too big"), 413, "request_too_large", "INVALID_ARGUMENT"),
    (errors.AuthenticationError("no key"), 401, "authentication_error", "UNAUTHENTICATED"),
    (errors.ModelNotFoundError("gpt-4"), 404, "not_found_error", "NOT_FOUND"),
    (errors.RouteNotFoundError("GET /x"), 404, "not_found_error", "UNIMPLEMENTED"),
    (errors.CapacityError("queue full"), 429, "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    (errors.RequestAbortedError("gone"), 499, "request_aborted", "CANCELLED"),
    (errors.StageFailedError("stage 1 died"), 503, "service_unavailable", "UNAVAILABLE"),
    (errors.RequestTimeoutError("600s"), 504, "timeout", "DEADLINE_EXCEEDED"),
]


@pytest.mark.parametrize(
    "exc, status, err_type, code", CASES, ids=[type(c[0]).__name__ for c in CASES]
)
def test_each_error_class_has_its_status_and_code_and_keeps_its_message(
    exc, status, err_type, code
):
    assert http_status(exc) == (status, err_type, str(exc))
    assert grpc_status(exc) == (code, str(exc))


def test_every_error_class_of_the_package_is_mapped():
    mapped = {type(c[0]) for c in CASES} | {errors.ConfigError}
    assert set(errors.JambaRayError.__subclasses__()) | {errors.RequestTooLargeError} == mapped


def test_an_unexpected_error_is_a_500_or_internal_that_leaks_nothing():
    secret = RuntimeError("/home/me/model.py line 3: tensor of shape [4, 9] has no attribute")
    assert http_status(secret) == (500, "server_error", "internal server error")
    assert grpc_status(secret) == ("INTERNAL", "internal server error")
    assert http_status(errors.ConfigError("bad layout"))[0] == 500


def test_the_body_is_openai_shaped_and_only_429_and_503_ask_for_a_retry():
    assert error_body(400, "invalid_request_error", "bad", "top_p") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "top_p", "code": 400}
    }
    assert retry_headers(429) == retry_headers(503) == {"Retry-After": "1"}
    assert all(retry_headers(s) == {} for s in (400, 401, 404, 413, 499, 500, 504))
