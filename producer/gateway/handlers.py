"""Every failure answered in the OpenAI shape, ``param`` naming the offending field where there is one."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from gpulb.errors import BatchNotFound, BrokerUnavailable, GpulbError, InvalidRequest, ResultTimeout, field_error
from producer.gateway.guard import REQUEST_ID_HEADER, Refused
from producer.gateway.responses import OpenAIError, error_response, leading_field
from producer.gateway.store import FileTooLarge

INVALID = "invalid_request_error"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, openai_error)  # type: ignore[arg-type]
    app.add_exception_handler(GpulbError, gpulb_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)


async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.kind, exc.code, param=exc.param, retry=exc.retry)


async def gpulb_error(request: Request, exc: GpulbError) -> JSONResponse:
    if isinstance(exc, BatchNotFound):
        return error_response(404, str(exc), INVALID, "not_found")
    if isinstance(exc, FileTooLarge):
        return error_response(413, str(exc), INVALID, "file_too_large", retry=False)
    if isinstance(exc, InvalidRequest):
        return error_response(400, str(exc), INVALID, "invalid_request", param=leading_field(str(exc)))
    if isinstance(exc, ResultTimeout):  # it was cancelled: a retry would wait as long again
        return error_response(504, str(exc), "server_error", "timeout", retry=False)
    if isinstance(exc, BrokerUnavailable):
        return error_response(503, "the queue (Redis) is unavailable; retry shortly", "server_error", None)
    return error_response(500, str(exc), "server_error", None)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":  # its place is a character offset, not a field
        return error_response(400, "the request body is not valid JSON", INVALID, "invalid_json")
    field, message = field_error(first, skip=("body", "query"))
    return error_response(400, f"{field}: {message}" if field else message, INVALID, "invalid_request",
                          param=field or None)  # fmt: skip


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc, Refused):  # cut off while the body came in: read no more of it
        return error_response(exc.status_code, exc.detail, INVALID, exc.code, retry=exc.status_code != 413,
                              close=True)  # fmt: skip
    message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else exc.detail
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return error_response(exc.status_code, message, INVALID, None, headers=headers)


def allowed_methods(request: Request) -> str:
    """Every method some route takes at this path: Starlette's own ``Allow`` names only the first route's."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Its traceback goes to the log. This answer leaves outside the guard, so it adds the request id itself."""
    request_id = getattr(request.state, "request_id", None)
    return error_response(500, "internal error in the gateway; its log has the details", "server_error", None,
                          headers={REQUEST_ID_HEADER: request_id} if request_id else None)  # fmt: skip
