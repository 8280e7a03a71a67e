"""Errors as the OpenAI API answers them: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastapi.responses import JSONResponse

# Producer messages name their field first ("body.temperature: ...", "max_tokens: ..."); "request" is the whole one.
LEADING_FIELD = re.compile(r"(?:body\.)?([A-Za-z_]\w*(?:\.\w+)*): ")
WHOLE_REQUEST = "request"


class OpenAIError(Exception):
    """An error answered in the OpenAI shape; ``param`` names the offending field, when there is one."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
        *, param: str | None = None, retry: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.param, self.retry = param, retry


def error_response(
    status: int, message: str, kind: str, code: str | None = None, *, param: str | None = None, retry: bool = True,
    close: bool = False, headers: Mapping[str, str] | None = None,
) -> JSONResponse:  # fmt: skip
    """The OpenAI error shape; ``retry=False`` tells the openai client not to send the request again, ``close``
    ends the connection (its request body is not read any further)."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    all_headers = dict(headers or {})
    if not retry:
        all_headers["x-should-retry"] = "false"
    if close:
        all_headers["connection"] = "close"
    return JSONResponse(body, status_code=status, headers=all_headers)


def leading_field(message: str) -> str | None:
    """The field a producer message names first (``body.temperature: ...`` -> ``temperature``), else None."""
    match = LEADING_FIELD.match(message)
    return match.group(1) if match and match.group(1) != WHOLE_REQUEST else None
