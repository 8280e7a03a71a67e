"""The OpenAI Batch API on gpulb: create from an uploaded file, follow, finalize into files, cancel, expire."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from gpulb.errors import InvalidRequest
from gpulb.logs import get_logger
from gpulb.models import BatchState, BatchStatus, Result
from gpulb.settings import Settings
from producer.batchfile import ENDPOINTS, BadBatchFile, output_line, parse_batch_lines
from producer.client import Client
from producer.gateway.store import COMPLETION_WINDOWS, EVERYONE, FINAL, BatchRecord, BatchRecords, FileStore, Tenant

log = get_logger("gpulb.gateway")
OUTPUT_PURPOSE = "batch_output"


class BatchService:
    """``serves``: whether a live worker serves a model; a batch for one that none serves fails at once. None:
    no check, the batch waits in the queue for a worker."""

    def __init__(self, client: Client, files: FileStore, records: BatchRecords, settings: Settings,
                 serves: Callable[[str], bool] | None = None) -> None:  # fmt: skip
        self.client, self.files, self.records, self.settings = client, files, records, settings
        self.serves = serves

    def create(self, *, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, str] | None,
               tenant: Tenant, output_ttl_s: int | None = None) -> BatchRecord:  # fmt: skip
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"endpoint: {endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}")
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequest(f"completion_window: {completion_window!r} is not supported; use '24h'")
        content = self.files.content(input_file_id, tenant).decode("utf-8", errors="replace")
        record = BatchRecord(f"batch_{secrets.token_hex(8)}", endpoint, input_file_id, completion_window,
                             int(time.time()), metadata=dict(metadata or {}), tenant=tenant.id,
                             output_ttl_s=output_ttl_s)  # fmt: skip
        try:
            batch_file = parse_batch_lines(
                content.split("\n"), default_max_tokens=self.settings.producer.default_max_tokens,
                limits=self.settings.producer, source=input_file_id, endpoint=endpoint,
            )  # fmt: skip
        except BadBatchFile as exc:
            return self._failed(record, [{"code": "invalid_request", "message": m, "line": n, "param": None}
                                         for n, m in exc.lines])  # fmt: skip
        except InvalidRequest as exc:
            return self._failed(record, [{"code": "invalid_request", "message": str(exc), "line": None, "param": None}])
        record.model = batch_file.model
        if self.serves is not None and not self.serves(batch_file.model):
            return self._failed(record, [_model_not_found(batch_file.model)])
        handle = self.client.submit_batch(batch_file.checked, model=batch_file.model,
                                          metadata={"endpoint": endpoint, "gateway_batch": record.id})  # fmt: skip
        record.gpulb_batch, record.status = handle.id, "in_progress"
        record.times["in_progress_at"] = int(time.time())
        record.counts["total"] = handle.total
        self.records.save(record)
        log.info("batch created", batch=record.id, gpulb_batch=handle.id, requests=handle.total, tenant=tenant.id)
        return record

    def _failed(self, record: BatchRecord, errors: list[dict[str, Any]]) -> BatchRecord:
        record.status, record.errors = "failed", errors
        record.times["failed_at"] = int(time.time())
        self.records.save(record)
        return record

    def get(self, batch_id: str, tenant: Tenant) -> BatchRecord:
        """The batch as it stands now, if ``tenant`` may read it; a batch whose requests are all answered is
        finalized here."""
        record = self.records.get(batch_id, tenant)
        if record.status in FINAL:
            return record
        status = self.client.batch_status(record.gpulb_batch)
        record.counts = {
            "total": status.total,
            "completed": status.completed,
            "failed": status.failed + status.cancelled,
        }
        if not status.finished and time.time() > record.expires_at and "expired_at" not in record.times:
            record.times["expired_at"] = int(time.time())  # the window closed: stop what has not started
            if not self.records.save(record, unless_final=True):
                return self.records.get(batch_id, EVERYONE)
            self.client.get_batch(record.gpulb_batch).cancel()
            status = self.client.batch_status(record.gpulb_batch)
        if status.finished and self.records.claim_finalize(batch_id):
            try:
                return self._finalize(batch_id, status)
            except BaseException:
                self.records.release_finalize(batch_id)  # let the next read try again at once
                raise
        return record

    def cancel(self, batch_id: str, tenant: Tenant) -> BatchRecord:
        record = self.records.get(batch_id, tenant)
        if record.status not in FINAL:
            record.status = "cancelling"
            record.times.setdefault("cancelling_at", int(time.time()))
        if record.status in FINAL or not self.records.save(record, unless_final=True):
            final = self.records.get(batch_id, EVERYONE)  # it finished meanwhile
            raise InvalidRequest(f"Cannot cancel a batch with status {final.status!r}")
        self.client.get_batch(record.gpulb_batch).cancel()
        return self.get(batch_id, EVERYONE)

    def _finalize(self, batch_id: str, status: BatchStatus) -> BatchRecord:
        record = self.records.get(batch_id, EVERYONE)  # re-read under the claim: a cancel may have landed meanwhile
        if record.status in FINAL:
            return record
        record.counts = {"total": status.total, "completed": status.completed,
                         "failed": status.failed + status.cancelled}  # fmt: skip
        record.times["finalizing_at"] = int(time.time())
        results = self.client.get_batch(record.gpulb_batch).results(timeout=0)
        record.output_file_id = self._write(record, [r for r in results if r.ok], "output")
        record.error_file_id = self._write(record, [r for r in results if not r.ok], "errors")
        record.status = _final_status(record, status)
        record.times[f"{record.status}_at"] = int(time.time())
        self.records.save(record)
        log.info("batch finalized", batch=record.id, status=record.status, **record.counts)
        return record

    def _write(self, record: BatchRecord, results: list[Result], kind: str) -> str | None:
        if not results:
            return None
        lines = [output_line(r, model=record.model, endpoint=record.endpoint, batch_id=record.id) for r in results]
        if "expired_at" in record.times:  # cut by the completion window, as the hosted API names it
            for line in lines:
                if line["error"] and line["error"]["code"] == "cancelled":
                    line["error"]["code"] = "batch_expired"
        content = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        stored = self.files.put(content, filename=f"{record.id}_{kind}.jsonl", purpose=OUTPUT_PURPOSE,
                                 tenant=record.tenant, limited=False, ttl_s=record.output_ttl_s)  # fmt: skip
        return stored.id

    def finalize_due(self) -> int:
        """Bring every unfinished batch up to date (the gateway calls this every second)."""
        finalized = 0
        for batch_id in self.records.active():
            try:
                finalized += self.get(batch_id, EVERYONE).status in FINAL
            except Exception as exc:  # one broken record must not stop the others
                log.warning("could not refresh batch", batch=batch_id, error=f"{type(exc).__name__}: {exc}")
        return finalized


def _model_not_found(model: str) -> dict[str, Any]:
    message = f"The model {model!r} does not exist or no live worker serves it; nothing was enqueued"
    return {"code": "model_not_found", "message": message, "param": "body.model", "line": 1}


def _final_status(record: BatchRecord, status: BatchStatus) -> str:
    if "expired_at" in record.times:
        return "expired"
    if record.status == "cancelling" or status.state is BatchState.CANCELLED:
        return "cancelled"
    return "completed"
