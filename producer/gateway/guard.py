"""The gateway's edge: who may ask, how much a request may send, and how slowly.

- Keys: ``Authorization: Bearer KEY`` against ``gateway.api_keys`` and ``gateway.admin_api_keys``. Each key is a
  tenant (named by a hash of the key); an admin key reads every tenant's files and batches. No keys at all: one
  tenant that everybody is, as an open gateway always was.
- Sizes: a ``Content-Length`` over the limit is refused before the body is read; a body without one (chunked)
  is counted as it comes in and cut off at the limit. Both answer 413 and close the connection.
- Every answer carries an ``x-request-id`` (``req_<hex>``), those refused here included; the handlers find it in
  ``request.state.request_id`` and the log lines of the request carry it.
- Time: a connection must bring a whole request head within ``header_timeout_s`` (a watch on the uvicorn
  protocol), and its body within ``body_timeout_s`` plus a second for every ``body_min_bytes_per_s`` received
  (408). A slow client cannot hold a connection for longer.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

import structlog
from starlette.exceptions import HTTPException

from gpulb.settings import GatewaySettings
from producer.gateway.responses import error_response
from producer.gateway.store import EVERYONE, Tenant, tenant_id

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
MULTIPART_SLACK = 64 * 1024  # form boundaries and fields around an uploaded file
REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def with_request_id(send: Send, request_id: str) -> Send:
    """``send``, adding the ``x-request-id`` header to the response's head."""

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            header = (REQUEST_ID_HEADER.encode(), request_id.encode())
            message["headers"] = [*message.get("headers", []), header]
        await send(message)

    return send_with_id


class Refused(HTTPException):
    """A request cut off while its body came in: answered in the OpenAI shape, and the connection closed."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message)
        self.code = code


def bearer_token(header: str | None) -> bytes | None:
    """The key of ``Authorization: Bearer KEY`` (the scheme in any case, RFC 7235); None for any other form."""
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode()


class Keys:
    """The configured API keys, and which tenant a request's ``Authorization`` header makes it."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.users = [k.get_secret_value().encode() for k in settings.api_keys]
        self.admins = [k.get_secret_value().encode() for k in settings.admin_api_keys]

    @property
    def open(self) -> bool:
        return not self.users and not self.admins

    def tenant(self, header: str | None) -> Tenant | None:
        """The tenant that asks, or None: no key, a wrong key, or not a bearer key."""
        if self.open:
            return EVERYONE
        token = bearer_token(header)
        if token is None:
            return None
        admin = _known(token, self.admins)
        if not admin and not _known(token, self.users):
            return None
        return Tenant(tenant_id(token), sees_all=admin)


def _known(token: bytes, keys: list[bytes]) -> bool:
    return any([hmac.compare_digest(token, key) for key in keys])  # each compared in constant time, all compared


class Limit(NamedTuple):
    """How many body bytes a request may send (``enforced``), as the error states it (``stated``, ``setting``)."""

    enforced: int
    stated: int
    setting: str

    def message(self, size: str) -> str:
        return f"request of {size} bytes exceeds the limit of {self.stated:,} bytes ({self.setting})"


def body_limit(scope: MutableMapping[str, Any], cfg: GatewaySettings) -> Limit:
    if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
        return Limit(cfg.max_file_bytes + MULTIPART_SLACK, cfg.max_file_bytes, "GPULB_GATEWAY__MAX_FILE_BYTES")
    return Limit(cfg.max_json_bytes, cfg.max_json_bytes, "GPULB_GATEWAY__MAX_JSON_BYTES")


class LimitedBody:
    """The ``receive`` the app reads the body through: 413 past the limit, 408 when the body comes too slowly."""

    def __init__(self, receive: Receive, limit: Limit, cfg: GatewaySettings) -> None:
        self.receive, self.limit, self.cfg = receive, limit, cfg
        self.started, self.seen, self.done = time.monotonic(), 0, False

    async def __call__(self) -> Message:
        if self.done:  # after the body: waiting for a disconnect may take as long as it takes
            return await self.receive()
        try:
            async with asyncio.timeout(self._deadline() - time.monotonic()):
                message = await self.receive()
        except TimeoutError:
            raise Refused(408, f"the request body did not arrive in time ({self.seen:,} bytes after "
                               f"{time.monotonic() - self.started:.0f} s; GPULB_GATEWAY__BODY_TIMEOUT_S)",
                          "request_timeout") from None  # fmt: skip
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.seen > self.limit.enforced:
                raise Refused(413, self.limit.message(f"more than {self.limit.enforced:,}"), "file_too_large")
        return message

    def _deadline(self) -> float:
        return self.started + self.cfg.body_timeout_s + self.seen / self.cfg.body_min_bytes_per_s


class GuardMiddleware:
    """Refuse, before a byte of the body is read: a missing or wrong key (401), a declared size too large (413).
    Then hand the app the tenant (``request.state.tenant``) and a body reader that enforces size and time."""

    def __init__(self, app: ASGIApp, keys: Keys, settings: GatewaySettings) -> None:
        self.app, self.keys, self.cfg = app, keys, settings

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self._guarded(scope, receive, with_request_id(send, request_id))

    async def _guarded(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        tenant, limit = self.keys.tenant(headers.get("authorization")), body_limit(scope, self.cfg)
        if tenant is None:
            refusal = error_response(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key",
                                     close=True)  # fmt: skip
            await refusal(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit.enforced:
            refusal = error_response(413, limit.message(f"{int(length):,}"), "invalid_request_error",
                                     "file_too_large", retry=False, close=True)  # fmt: skip
            await refusal(scope, receive, send)
            return
        scope["state"]["tenant"] = tenant
        await self.app(scope, LimitedBody(receive, limit, self.cfg), send)


class HeadWatch:
    """Closes a connection that has had no request in progress, and no new request head, for a whole period."""

    BUSY = object()

    def __init__(self, protocol: Any, transport: asyncio.BaseTransport, period_s: float) -> None:
        self.protocol, self.transport, self.period_s = protocol, transport, period_s
        self.seen: object = None  # the request (uvicorn's cycle) that was the latest at the last look

    def arm(self) -> None:
        asyncio.get_running_loop().call_later(self.period_s, self.look)

    def look(self) -> None:
        if self.transport.is_closing():
            return
        cycle = getattr(self.protocol, "cycle", None)
        idle = cycle is None or bool(cycle.response_complete)
        if idle and cycle is self.seen:  # nothing new for a whole period: a slow or silent client
            self.transport.close()
            return
        self.seen = cycle if idle else self.BUSY
        self.arm()


def guarded_protocol(header_timeout_s: float) -> type[Any]:
    """uvicorn's HTTP protocol (httptools or h11), with a :class:`HeadWatch` on every connection."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            HeadWatch(self, transport, header_timeout_s).arm()

    return GuardedHTTPProtocol
