"""``gpulb gateway``: the OpenAI REST API on a gpulb fleet (files, batches, completions, chat, models).

Point the official client at it: ``OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY)``.
Online requests are one-request gpulb batches at ``gateway.online_priority``, so they pass batch
traffic in the ingress; waiting for their results happens in worker threads (a bounded number).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from gpulb import keys
from gpulb.connection import connect
from gpulb.errors import InvalidRequest, ResultTimeout
from gpulb.logs import get_logger
from gpulb.models import Result
from gpulb.settings import Settings
from producer.batchfile import (
    BASE64,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    FLOAT,
    in_base64,
    request_from_body,
    response_body,
)
from producer.client import BatchHandle, Client
from producer.gateway.batches import BatchService
from producer.gateway.fleet import ServedModels
from producer.gateway.guard import GuardMiddleware, Keys, guarded_protocol
from producer.gateway.handlers import install_error_handlers
from producer.gateway.responses import OpenAIError
from producer.gateway.store import BatchRecords, FilePage, FileStore, Tenant
from producer.gateway.streaming import Chunks, stream_response
from producer.validation import CheckedRequest, validate_metadata

log = get_logger("gpulb.gateway")
FINALIZE_EVERY_S = 1.0
MIN_EXPIRES_S, MAX_EXPIRES_S = 3600, 30 * 24 * 3600  # expires_after's seconds, as the OpenAI API allows
MAX_FILES_LISTED, MAX_BATCHES_LISTED = 10_000, 100


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRES_S, le=MAX_EXPIRES_S)


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: object = None  # checked by validate_metadata, so that every refusal names "metadata"
    output_expires_after: ExpiresAfter | None = None


class Gateway:
    """The state the routes share: one producer client, the stores, the batch service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(settings.redis_url, settings=settings)
        gw = settings.gateway
        self.files = FileStore(connect(settings, decode=False), gw.max_file_bytes, gw.file_ttl_s)  # bytes in and out
        self.records = BatchRecords(self.client.connection)
        self.served = ServedModels(self.client.connection)
        self.batches = BatchService(self.client, self.files, self.records, settings, serves=self.served.serves)
        self.online_slots = anyio.CapacityLimiter(settings.gateway.max_waiting_online)
        # streams read their pieces in threads of their own: a plain request waiting 600 s must not stall a stream
        self.stream_reads = anyio.CapacityLimiter(settings.gateway.max_waiting_online)
        self.keys = Keys(settings.gateway)
        self.started_at = int(time.time())

    def model_object(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self.started_at, "owned_by": "gpulb"}

    def check_ttl(self, seconds: int, param: str) -> int:
        """``seconds`` of an expiry policy, if files are kept that long (``gateway.file_ttl_s``)."""
        if seconds > self.settings.gateway.file_ttl_s:
            raise OpenAIError(400, f"{param}: {seconds} s is longer than this gateway keeps files "
                                   f"({self.settings.gateway.file_ttl_s} s, GPULB_GATEWAY__FILE_TTL_S)",
                              code="invalid_expires_after", param=param)  # fmt: skip
        return seconds


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model {model!r} does not exist or no live worker serves it", code="model_not_found",
                       param="model")  # fmt: skip


def _tenant(request: Request) -> Tenant:
    tenant: Tenant = request.state.tenant  # set by GuardMiddleware for every request
    return tenant


Caller = Annotated[Tenant, Depends(_tenant)]


def create_app(settings: Settings) -> FastAPI:
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gateway.keys.open:
            log.warning("NO API KEYS CONFIGURED: the gateway accepts every request. Set GPULB_GATEWAY__API_KEYS.")
        task = asyncio.create_task(_finalize_loop(gateway))
        yield
        task.cancel()
        gateway.client.close()

    app = FastAPI(title="gpulb gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.add_middleware(GuardMiddleware, keys=gateway.keys, settings=settings.gateway)

    install_error_handlers(app)
    _add_file_routes(app, gateway)  # every route is behind GuardMiddleware's key check
    _add_batch_routes(app, gateway)
    _add_online_routes(app, gateway)
    return app


async def _finalize_loop(gateway: Gateway) -> None:
    while True:
        await asyncio.sleep(FINALIZE_EVERY_S)
        try:
            await anyio.to_thread.run_sync(gateway.batches.finalize_due)
        except Exception as exc:  # Redis away, for one: try again next round
            log.warning("batch finalizer failed", error=f"{type(exc).__name__}: {exc}")


def listed(data: Sequence[dict[str, Any]], more: bool) -> dict[str, Any]:
    """A page of a list, as OpenAI's cursor pagination reads it."""
    return {"object": "list", "data": list(data), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}  # fmt: skip


UploadAnchor = Annotated[Literal["created_at"] | None, Form(alias="expires_after[anchor]")]
UploadSeconds = Annotated[int | None, Form(alias="expires_after[seconds]", ge=MIN_EXPIRES_S, le=MAX_EXPIRES_S)]


def _upload_ttl(gateway: Gateway, anchor: str | None, seconds: int | None) -> int | None:
    """The seconds of an upload's ``expires_after``, if given whole (both fields) and within the store's TTL."""
    if anchor is None and seconds is None:
        return None
    if seconds is None or anchor is None:
        missing = "expires_after[seconds]" if seconds is None else "expires_after[anchor]"
        raise OpenAIError(400, f"{missing}: required with expires_after", code="invalid_expires_after", param=missing)
    return gateway.check_ttl(seconds, "expires_after[seconds]")


def _add_file_routes(app: FastAPI, gateway: Gateway) -> None:

    @app.post("/v1/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()], tenant: Caller,
                     anchor: UploadAnchor = None, seconds: UploadSeconds = None) -> dict[str, Any]:  # fmt: skip
        if purpose != "batch":
            raise OpenAIError(400, f"purpose: {purpose!r} is not supported; use 'batch'", code="invalid_purpose",
                              param="purpose")  # fmt: skip
        ttl_s = _upload_ttl(gateway, anchor, seconds)
        content = await file.read(gateway.settings.gateway.max_file_bytes + 1)
        name = file.filename or "upload.jsonl"
        stored = await anyio.to_thread.run_sync(
            lambda: gateway.files.put(content, filename=name, purpose=purpose, tenant=tenant.id, ttl_s=ttl_s)
        )
        return stored.as_openai()

    @app.get("/v1/files")
    async def list_files(
        tenant: Caller, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_FILES_LISTED)] = 10_000,
        order: Literal["asc", "desc"] = "desc", purpose: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        wanted = FilePage(after, limit, order, purpose)
        files, more = await anyio.to_thread.run_sync(gateway.files.page, tenant, wanted)
        return listed([f.as_openai() for f in files], more)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, tenant: Caller) -> dict[str, Any]:
        return (await anyio.to_thread.run_sync(gateway.files.get, file_id, tenant)).as_openai()

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, tenant: Caller) -> Response:
        content = await anyio.to_thread.run_sync(gateway.files.content, file_id, tenant)
        return Response(content, media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, tenant: Caller) -> dict[str, Any]:
        await anyio.to_thread.run_sync(gateway.files.delete, file_id, tenant)
        return {"id": file_id, "object": "file", "deleted": True}


def _checked_metadata(metadata: object) -> dict[str, str]:
    try:
        return validate_metadata(metadata)
    except InvalidRequest as exc:
        raise OpenAIError(400, str(exc), code="invalid_metadata", param="metadata") from None


def _add_batch_routes(app: FastAPI, gateway: Gateway) -> None:
    service = gateway.batches

    @app.post("/v1/batches")
    async def create_batch(body: BatchCreate, tenant: Caller) -> dict[str, Any]:
        metadata = _checked_metadata(body.metadata)
        expiry = body.output_expires_after
        output_ttl_s = gateway.check_ttl(expiry.seconds, "output_expires_after.seconds") if expiry else None

        def create() -> dict[str, Any]:
            record = service.create(input_file_id=body.input_file_id, endpoint=body.endpoint,
                                    completion_window=body.completion_window, metadata=metadata, tenant=tenant,
                                    output_ttl_s=output_ttl_s)  # fmt: skip
            return record.as_openai()

        return await anyio.to_thread.run_sync(create)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, tenant: Caller) -> dict[str, Any]:
        return (await anyio.to_thread.run_sync(service.get, batch_id, tenant)).as_openai()

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, tenant: Caller) -> dict[str, Any]:
        return (await anyio.to_thread.run_sync(service.cancel, batch_id, tenant)).as_openai()

    @app.get("/v1/batches")
    async def list_batches(
        tenant: Caller, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_BATCHES_LISTED)] = 20
    ) -> dict[str, Any]:
        records, more = await anyio.to_thread.run_sync(lambda: gateway.records.page(after, limit, tenant))
        return listed([r.as_openai() for r in records], more)


def _add_online_routes(app: FastAPI, gateway: Gateway) -> None:

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = await anyio.to_thread.run_sync(gateway.served.all)
        return {"object": "list", "data": [gateway.model_object(m) for m in served]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model not in await anyio.to_thread.run_sync(gateway.served.all):
            raise model_not_found(model)
        return gateway.model_object(model)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _online(gateway, COMPLETIONS, await _json_body(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _online(gateway, CHAT, await _json_body(request))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        return await _online(gateway, EMBEDDINGS, await _json_body(request))


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


async def _online(gateway: Gateway, endpoint: str, body: dict[str, Any]) -> Any:
    stream, include_usage = _streaming(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model: required", code="invalid_model", param="model")
    cfg = gateway.settings
    limits = cfg.producer
    plain = body if endpoint == EMBEDDINGS else {**body, "stream": False, "stream_options": None}
    encodings = (FLOAT, BASE64)
    checked = request_from_body(endpoint, None, plain, limits.default_max_tokens, limits, encodings=encodings)
    if stream:
        streamed = CheckedRequest(checked.fields, checked.spec.model_copy(update={"stream": True}))
        return await _open_stream(gateway, endpoint, model, streamed, include_usage)

    def run() -> dict[str, Any]:
        if not gateway.served.serves(model):
            raise model_not_found(model)
        batch = gateway.client.submit_batch([checked], model=model, priority=cfg.gateway.online_priority,
                                            result_ttl_s=cfg.gateway.online_result_ttl_s, listed=False)  # fmt: skip
        try:
            (result,) = batch.results(timeout=cfg.gateway.online_timeout_s)
        except ResultTimeout:
            batch.cancel()  # nobody waits for it any more
            raise
        if not result.ok:
            raise failure(result)
        answer = response_body(result, model, endpoint)
        return in_base64(answer) if body.get("encoding_format") == BASE64 else answer

    return await anyio.to_thread.run_sync(run, limiter=gateway.online_slots)


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``, checked as the OpenAI API does."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise OpenAIError(400, f"stream: {stream!r} is not a boolean", param="stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise OpenAIError(400, "stream_options: only allowed with stream: true", param="stream_options")
    usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(usage, bool) or set(options) - {"include_usage"}:
        raise OpenAIError(400, f"stream_options: {options!r} is not supported (only include_usage, a boolean)",
                          param="stream_options")  # fmt: skip
    return True, usage


async def _open_stream(
    gateway: Gateway, endpoint: str, model: str, request: CheckedRequest, include_usage: bool
) -> Any:  # fmt: skip
    """Submit, then answer with server-sent events (a refusal before the first event is an ordinary error)."""
    cfg = gateway.settings.gateway

    def submit() -> BatchHandle:
        if not gateway.served.serves(model):
            raise model_not_found(model)
        return gateway.client.submit_batch([request], model=model, priority=cfg.online_priority,
                                           result_ttl_s=cfg.online_result_ttl_s, listed=False)  # fmt: skip

    batch = await anyio.to_thread.run_sync(submit)
    chunks = Chunks(endpoint, model, keys.request_id(batch.id, 0), include_usage)
    return stream_response(batch, chunks, cfg.online_timeout_s, gateway.stream_reads)


def failure(result: Result) -> OpenAIError:
    """A failed online request; it already had its tries on the fleet, so the client must not send it again."""
    status = result.error_status
    if status is not None and 400 <= status < 500:  # the engine refused the request itself: the client's error
        return OpenAIError(status, str(result.error), "invalid_request_error", "invalid_request", retry=False)
    return OpenAIError(500, f"the request failed: {result.error}", "server_error", "request_failed", retry=False)


def run_gateway(settings: Settings) -> None:
    import uvicorn

    cfg = settings.gateway
    log.info("gateway listening", url=f"http://{cfg.host}:{cfg.port}/v1", keys=len(cfg.api_keys),
             admin_keys=len(cfg.admin_api_keys))  # fmt: skip
    uvicorn.run(create_app(settings), host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                http=guarded_protocol(cfg.header_timeout_s), timeout_keep_alive=cfg.keep_alive_timeout_s)  # fmt: skip
