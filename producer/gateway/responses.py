"""Errors as the OpenAI API answers them: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class OpenAIError(Exception):
    """An error answered in the OpenAI shape: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
        *, retry: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.retry = status, message, kind, code, retry


def error_response(
    status: int, message: str, kind: str, code: str | None = None, *, retry: bool = True, close: bool = False
) -> JSONResponse:
    """The OpenAI error shape; ``retry=False`` tells the openai client not to send the request again, ``close``
    ends the connection (its request body is not read any further)."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {} if retry else {"x-should-retry": "false"}
    if close:
        headers["connection"] = "close"
    return JSONResponse(body, status_code=status, headers=headers)
