"""HTTP plumbing of the app: errors as OpenAI error JSON, bodies that fail validation, and the
guard that turns an error after a stream started into an SSE error event."""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..errors import InvalidRequestError, RequestTimeoutError
from .errors import error_body, http_status, retry_headers

log = logging.getLogger("jamba_ray.serve")


def error_response(exc: BaseException) -> JSONResponse:
    status, err_type, message = http_status(exc)
    if status == 500:
        log.exception("unexpected error", exc_info=exc)
    body = error_body(status, err_type, message, getattr(exc, "param", None))
    return JSONResponse(body, status, headers=retry_headers(status))


async def guard(events, timeout_s: float):
    """An error (or the request timeout) after the stream started becomes an SSE error event."""
    try:
        async with asyncio.timeout(timeout_s):
            async for e in events:
                yield e
    except asyncio.CancelledError:
        raise
    except Exception as e:
        if isinstance(e, TimeoutError):
            e = RequestTimeoutError(f"request exceeded its {timeout_s:.0f}s timeout")
        status, err_type, message = http_status(e)
        yield f"data: {json.dumps(error_body(status, err_type, message))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


def invalid(e: ValidationError) -> InvalidRequestError:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, InvalidRequestError):  # raised by a model's own check: already worded
        return cause
    if first["type"] == "json_invalid":
        return InvalidRequestError(f"the request body is not valid JSON: {first['msg']}")
    if first["type"] == "extra_forbidden":
        return InvalidRequestError(f"unknown field '{where}': it is not part of this API", where)
    return InvalidRequestError(f"invalid field '{where}': {first['msg']}", where or None)
