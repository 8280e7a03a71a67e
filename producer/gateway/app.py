"""``gpulb gateway``: the OpenAI REST API on a gpulb fleet (files, batches, completions, chat, models).

Point the official client at it: ``OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY)``.
Online requests are one-request gpulb batches at ``gateway.online_priority``, so they pass batch
traffic in the ingress; waiting for their results happens in worker threads (a bounded number).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from gpulb import keys
from gpulb.connection import connect
from gpulb.errors import BatchNotFound, BrokerUnavailable, GpulbError, InvalidRequest, ResultTimeout
from gpulb.logs import get_logger
from gpulb.settings import Settings
from producer.batchfile import CHAT, COMPLETIONS, request_from_body, response_body
from producer.client import Client
from producer.gateway.batches import BatchService
from producer.gateway.guard import GuardMiddleware, Keys, Refused, guarded_protocol
from producer.gateway.responses import OpenAIError, error_response
from producer.gateway.store import BatchRecords, FileStore, FileTooLarge, Tenant

log = get_logger("gpulb.gateway")
FINALIZE_EVERY_S = 1.0
SERVED_MODELS_FRESH_S = 1.0


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class Gateway:
    """The state the routes share: one producer client, the stores, the batch service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(settings.redis_url, settings=settings)
        conn = self.client._conn
        gw = settings.gateway
        self.files = FileStore(connect(settings, decode=False), gw.max_file_bytes, gw.file_ttl_s)  # bytes in and out
        self.records = BatchRecords(conn)
        self.batches = BatchService(self.client, self.files, self.records, settings)
        self.online_slots = anyio.CapacityLimiter(settings.gateway.max_waiting_online)
        self.keys = Keys(settings.gateway)
        self._served: tuple[float, frozenset[str]] = (0.0, frozenset())

    def serves(self, model: str) -> bool:
        """Whether a live worker serves ``model``, read at most once a second (online requests ask each time)."""
        read_at, served = self._served
        if time.monotonic() - read_at > SERVED_MODELS_FRESH_S or model not in served:
            served = frozenset(self.served_models())
            self._served = (time.monotonic(), served)
        return model in served

    def served_models(self) -> list[str]:
        conn = self.client._conn
        worker_ids: list[str] = sorted(conn.smembers(keys.workers_key()))  # type: ignore[arg-type]
        pipe = conn.pipeline(transaction=False)
        for worker_id in worker_ids:
            pipe.hget(keys.load_key(worker_id), "model")
        return sorted({m for m in pipe.execute() if m})


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

    app = FastAPI(title="gpulb gateway", version="1", lifespan=lifespan)
    app.add_middleware(GuardMiddleware, keys=gateway.keys, settings=settings.gateway)

    _install_error_handlers(app)
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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.code, retry=exc.retry)

    @app.exception_handler(GpulbError)
    async def gpulb_error(request: Request, exc: GpulbError) -> JSONResponse:
        if isinstance(exc, BatchNotFound):
            return error_response(404, str(exc), "invalid_request_error", "not_found")
        if isinstance(exc, FileTooLarge):
            return error_response(413, str(exc), "invalid_request_error", "file_too_large", retry=False)
        if isinstance(exc, InvalidRequest):
            return error_response(400, str(exc), "invalid_request_error", "invalid_request")
        if isinstance(exc, ResultTimeout):  # it was cancelled: a retry would wait as long again
            return error_response(504, str(exc), "server_error", "timeout", retry=False)
        if isinstance(exc, BrokerUnavailable):
            return error_response(503, "the queue (Redis) is unavailable; retry shortly", "server_error", None)
        return error_response(500, str(exc), "server_error", None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(400, f"{where}: {first['msg']}", "invalid_request_error", "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, Refused):  # cut off while the body came in: read no more of it
            return error_response(exc.status_code, exc.detail, "invalid_request_error", exc.code,
                                  retry=exc.status_code != 413, close=True)  # fmt: skip
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else exc.detail
        return error_response(exc.status_code, message, "invalid_request_error", None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # its traceback goes to the log
        return error_response(500, "internal error in the gateway; its log has the details", "server_error", None)


def _add_file_routes(app: FastAPI, gateway: Gateway) -> None:

    @app.post("/v1/files")
    async def upload(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()], tenant: Caller
    ) -> dict[str, Any]:
        if purpose != "batch":
            raise OpenAIError(400, f"purpose: {purpose!r} is not supported; use 'batch'", code="invalid_purpose")
        content = await file.read(gateway.settings.gateway.max_file_bytes + 1)
        name = file.filename or "upload.jsonl"
        stored = await anyio.to_thread.run_sync(
            lambda: gateway.files.put(content, filename=name, purpose=purpose, tenant=tenant.id)
        )
        return stored.as_openai()

    @app.get("/v1/files")
    async def list_files(tenant: Caller) -> dict[str, Any]:
        files = await anyio.to_thread.run_sync(gateway.files.list, tenant)
        return {"object": "list", "data": [f.as_openai() for f in files], "has_more": False}

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


def _add_batch_routes(app: FastAPI, gateway: Gateway) -> None:
    service = gateway.batches

    @app.post("/v1/batches")
    async def create_batch(body: BatchCreate, tenant: Caller) -> dict[str, Any]:
        def create() -> dict[str, Any]:
            record = service.create(input_file_id=body.input_file_id, endpoint=body.endpoint,
                                    completion_window=body.completion_window, metadata=body.metadata,
                                    tenant=tenant)  # fmt: skip
            return record.as_openai()

        return await anyio.to_thread.run_sync(create)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, tenant: Caller) -> dict[str, Any]:
        return (await anyio.to_thread.run_sync(service.get, batch_id, tenant)).as_openai()

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, tenant: Caller) -> dict[str, Any]:
        return (await anyio.to_thread.run_sync(service.cancel, batch_id, tenant)).as_openai()

    @app.get("/v1/batches")
    async def list_batches(tenant: Caller, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise OpenAIError(400, "limit: must be from 1 to 100", code="invalid_limit")
        records, more = await anyio.to_thread.run_sync(lambda: gateway.records.page(after, limit, tenant))
        data = [r.as_openai() for r in records]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}  # fmt: skip


def _add_online_routes(app: FastAPI, gateway: Gateway) -> None:

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = await anyio.to_thread.run_sync(gateway.served_models)
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "gpulb"} for m in served]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        return await _online(gateway, COMPLETIONS, await _json_body(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        return await _online(gateway, CHAT, await _json_body(request))


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


async def _online(gateway: Gateway, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("stream"):
        raise OpenAIError(400, "stream=true is not supported yet: send stream=false", code="stream_unsupported")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model: required", code="invalid_model")
    cfg = gateway.settings
    request = request_from_body(endpoint, None, {**body, "stream": False}, cfg.gateway.default_max_tokens, cfg.producer)
    request.pop("custom_id")

    def run() -> dict[str, Any]:
        if not gateway.serves(model):
            raise OpenAIError(
                404, f"The model {model!r} does not exist or no live worker serves it", code="model_not_found"
            )
        batch = gateway.client.submit_batch([request], model=model, priority=cfg.gateway.online_priority,
                                            result_ttl_s=cfg.gateway.online_result_ttl_s, listed=False)  # fmt: skip
        try:
            (result,) = batch.results(timeout=cfg.gateway.online_timeout_s)
        except ResultTimeout:
            batch.cancel()  # nobody waits for it any more
            raise
        if not result.ok:
            # it already had its tries on the fleet: the client must not send it again
            raise OpenAIError(500, f"the request failed: {result.error}", "server_error", "request_failed", retry=False)
        return response_body(result, model, endpoint)

    return await anyio.to_thread.run_sync(run, limiter=gateway.online_slots)


def run_gateway(settings: Settings) -> None:
    import uvicorn

    cfg = settings.gateway
    log.info("gateway listening", url=f"http://{cfg.host}:{cfg.port}/v1", keys=len(cfg.api_keys),
             admin_keys=len(cfg.admin_api_keys))  # fmt: skip
    uvicorn.run(create_app(settings), host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                http=guarded_protocol(cfg.header_timeout_s), timeout_keep_alive=cfg.keep_alive_timeout_s)  # fmt: skip
