"""What the gateway keeps in Redis: files (uploaded and produced) and OpenAI batch objects.

A gateway batch wraps one gpulb batch. Its OpenAI status is worked out from the gpulb batch's
state while it runs; once every request is answered, the gateway writes the output and error
files (``finalizing``) and stores the final status, so later reads need no gpulb batch at all.

Each file and batch belongs to a tenant (a hash of the API key that made it); a tenant reads only its own, and
what it may not read answers exactly as what does not exist. An id of the wrong shape does not exist either: it
never reaches a Redis key name.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from gpulb import keys
from gpulb.errors import BatchNotFound, InvalidRequest

FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
COMPLETION_WINDOWS = {"24h": 24 * 3600}
FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{1,64}")
BATCH_ID = re.compile(r"batch_[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who asks. ``id`` is recorded on what it creates; ``sees_all`` (an admin key) reads every tenant's."""

    id: str
    sees_all: bool = False

    def owns(self, owner: str) -> bool:
        return self.sees_all or owner == self.id


# The gateway itself (finalizer, outputs), and every caller of a gateway without keys: one tenant, as before.
EVERYONE = Tenant("", sees_all=True)


def tenant_id(api_key: bytes) -> str:
    """A short, non-reversible name for an API key's tenant; the key itself is never stored or logged."""
    return hashlib.sha256(b"gpulb gateway tenant:" + api_key).hexdigest()[:16]


class FileNotFound(BatchNotFound):
    """No file with this id (never uploaded, or deleted)."""


class FileTooLarge(InvalidRequest):
    """An upload over ``gateway.max_file_bytes``."""


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


@dataclass(slots=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    tenant: str = ""
    expires_at: int = 0

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "expires_at": self.expires_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class FilePage:
    """Which files to list: after the file ``after`` (none: from the start), ``order`` by creation, of ``purpose``
    only (none: all)."""

    after: str | None = None
    limit: int = 10_000
    order: str = "desc"
    purpose: str | None = None


class FileStore:
    FIELDS = ("id", "bytes", "created_at", "filename", "purpose", "tenant", "expires_at")
    SCAN_CHUNK = 500  # index entries read at a time while a page is filled

    def __init__(self, conn: redis.Redis, max_bytes: int, ttl_s: int) -> None:
        self.conn, self.max_bytes, self.ttl_s = conn, max_bytes, ttl_s

    def put(self, content: bytes, *, filename: str, purpose: str, tenant: str, limited: bool = True,
            ttl_s: int | None = None) -> StoredFile:  # fmt: skip
        """Store a file for ``ttl_s`` (default: the store's); ``limited``: refuse one over ``max_bytes`` (uploads,
        not our own outputs)."""
        if limited and len(content) > self.max_bytes:
            raise FileTooLarge(f"file of {len(content):,} bytes exceeds the limit of {self.max_bytes:,} bytes "
                               "(GPULB_GATEWAY__MAX_FILE_BYTES)")  # fmt: skip
        now = time.time()  # sub-second order for listing
        created_at = int(now)
        stored = StoredFile(new_file_id(), len(content), created_at, filename, purpose, tenant,
                            created_at + (ttl_s or self.ttl_s))  # fmt: skip
        pipe = self.conn.pipeline(transaction=True)
        fields: dict[str, str | int | bytes] = {**_as_fields(stored), "content": content}
        pipe.hset(keys.gateway_file_key(stored.id), mapping=fields)  # type: ignore[arg-type]
        pipe.expireat(keys.gateway_file_key(stored.id), stored.expires_at)
        pipe.zadd(keys.gateway_files_key(), {stored.id: now})
        if tenant:
            pipe.zadd(keys.gateway_tenant_files_key(tenant), {stored.id: now})
        pipe.execute()
        return stored

    def get(self, file_id: str, tenant: Tenant) -> StoredFile:
        """The file, if it exists and ``tenant`` may read it; else FileNotFound, the same either way."""
        stored = self._read([file_id])[0] if FILE_ID.fullmatch(file_id) else None
        if stored is None or not tenant.owns(stored.tenant):
            raise FileNotFound(f"No such File object: {file_id}")
        return stored

    def _read(self, file_ids: list[str]) -> list[StoredFile | None]:
        pipe = self.conn.pipeline(transaction=False)
        for file_id in file_ids:
            pipe.hmget(keys.gateway_file_key(file_id), list(self.FIELDS))
        return [self._parse(values) for values in pipe.execute()]

    def _parse(self, values: list[Any]) -> StoredFile | None:
        if values[0] is None:
            return None
        raw = dict(zip(self.FIELDS, (_text(v or b"") for v in values), strict=True))  # no tenant: from before tenants
        created_at = int(raw["created_at"])
        expires_at = int(raw["expires_at"] or created_at + self.ttl_s)  # none on a file from before expires_at
        return StoredFile(raw["id"], int(raw["bytes"]), created_at, raw["filename"], raw["purpose"], raw["tenant"],
                          expires_at)  # fmt: skip

    def content(self, file_id: str, tenant: Tenant) -> bytes:
        self.get(file_id, tenant)
        data = self.conn.hget(keys.gateway_file_key(file_id), "content")
        return data if isinstance(data, bytes) else str(data or "").encode()

    def delete(self, file_id: str, tenant: Tenant) -> None:
        stored = self.get(file_id, tenant)
        pipe = self.conn.pipeline(transaction=True)
        pipe.delete(keys.gateway_file_key(file_id))
        pipe.zrem(keys.gateway_files_key(), file_id)
        if stored.tenant:
            pipe.zrem(keys.gateway_tenant_files_key(stored.tenant), file_id)
        pipe.execute()

    def page(self, tenant: Tenant, wanted: FilePage) -> tuple[list[StoredFile], bool]:
        """The files ``tenant`` may read (an admin: everyone's) as ``wanted`` says; and whether more follow."""
        index = keys.gateway_files_key() if tenant.sees_all else keys.gateway_tenant_files_key(tenant.id)
        start = self._start(index, wanted)
        found: list[StoredFile] = []
        expired: list[str] = []
        while len(found) <= wanted.limit:
            ids = self._index_range(index, wanted.order, start, start + self.SCAN_CHUNK - 1)
            for file_id, stored in zip(ids, self._read(ids), strict=True):
                if stored is None:
                    expired.append(file_id)
                elif tenant.owns(stored.tenant) and wanted.purpose in (None, stored.purpose):
                    found.append(stored)
            if len(ids) < self.SCAN_CHUNK:
                break
            start += self.SCAN_CHUNK
        if expired:  # dropped from the index once the scan is over, so that ranks hold while it runs
            self.conn.zrem(index, *expired)
        return found[: wanted.limit], len(found) > wanted.limit

    def _start(self, index: str, wanted: FilePage) -> int:
        if wanted.after is None:
            return 0
        after = wanted.after
        rank = self._rank(index, after, wanted.order) if FILE_ID.fullmatch(after) else None
        if rank is None:
            raise FileNotFound(f"No such File object: {after}")
        return rank + 1

    def _rank(self, index: str, file_id: str, order: str) -> int | None:
        rank = self.conn.zrank(index, file_id) if order == "asc" else self.conn.zrevrank(index, file_id)
        return None if rank is None else int(rank)  # type: ignore[arg-type]

    def _index_range(self, index: str, order: str, start: int, end: int) -> list[str]:
        ids = self.conn.zrange(index, start, end) if order == "asc" else self.conn.zrevrange(index, start, end)
        return [_text(i) for i in ids]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _as_fields(stored: StoredFile) -> dict[str, str | int | bytes]:
    return {name: getattr(stored, name) for name in FileStore.FIELDS}


@dataclass(slots=True)
class BatchRecord:
    """An OpenAI batch object as stored; ``gpulb_batch`` is empty for a batch that failed validation."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    status: str = "validating"
    gpulb_batch: str = ""
    model: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, finalizing_at, completed_at, ...
    output_file_id: str | None = None
    error_file_id: str | None = None
    tenant: str = ""  # who created it (empty: a gateway without keys, or a record from before tenants)
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    output_ttl_s: int | None = None  # output_expires_after's seconds (none: the file store's TTL)

    @property
    def expires_at(self) -> int:
        return self.created_at + COMPLETION_WINDOWS.get(self.completion_window, 0)

    def as_openai(self) -> dict[str, Any]:
        names = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                 "cancelled_at")  # fmt: skip
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "model": self.model or None,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.expires_at,
            **{name: self.times.get(name) for name in names},
            "request_counts": dict(self.counts), "metadata": self.metadata or None,
        }  # fmt: skip


class BatchRecords:
    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    def save(self, record: BatchRecord, *, unless_final: bool = False) -> bool:
        """Store the record; with ``unless_final``, not over one that has become final meanwhile (False then)."""
        key = keys.gateway_batch_key(record.id)
        with self.conn.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                stored = pipe.hget(key, "record")
                if unless_final and stored is not None and json.loads(stored)["status"] in FINAL:
                    return False
                pipe.multi()
                self._write(pipe, record)
                pipe.execute()
            except redis.WatchError:
                return False if unless_final else self.save(record)
        return True

    def _write(self, pipe: redis.client.Pipeline, record: BatchRecord) -> None:
        pipe.hset(keys.gateway_batch_key(record.id), "record", json.dumps(_record_dict(record)))
        now = time.time()  # sub-second order for listing
        pipe.zadd(keys.gateway_batches_key(), {record.id: now}, nx=True)
        if record.tenant:
            pipe.zadd(keys.gateway_tenant_batches_key(record.tenant), {record.id: now}, nx=True)
        if record.status in FINAL:
            pipe.zrem(keys.gateway_active_key(), record.id)
        else:
            pipe.zadd(keys.gateway_active_key(), {record.id: record.created_at})

    def get(self, batch_id: str, tenant: Tenant) -> BatchRecord:
        """The batch, if it exists and ``tenant`` may read it; else BatchNotFound, the same either way."""
        raw = self.conn.hget(keys.gateway_batch_key(batch_id), "record") if BATCH_ID.fullmatch(batch_id) else None
        record = BatchRecord(**json.loads(raw)) if raw is not None else None
        if record is None or not tenant.owns(record.tenant):
            raise BatchNotFound(f"No such Batch object: {batch_id}")
        return record

    def page(self, after: str | None, limit: int, tenant: Tenant) -> tuple[list[BatchRecord], bool]:
        """Newest first of those ``tenant`` may read, starting after ``after``; and whether more follow."""
        index = keys.gateway_batches_key() if tenant.sees_all else keys.gateway_tenant_batches_key(tenant.id)
        start = 0
        if after is not None:
            rank = self.conn.zrevrank(index, after) if BATCH_ID.fullmatch(after) else None
            if rank is None:
                raise BatchNotFound(f"No such Batch object: {after}")
            start = int(rank) + 1  # type: ignore[arg-type]
        names = [_text(i) for i in self.conn.zrevrange(index, start, start + limit)]
        return [self.get(i, tenant) for i in names[:limit]], len(names) > limit

    def active(self) -> list[str]:
        return [
            i.decode() if isinstance(i, bytes) else str(i) for i in self.conn.zrange(keys.gateway_active_key(), 0, -1)
        ]

    def claim_finalize(self, batch_id: str) -> bool:
        """One gateway process writes a batch's output files; the claim lapses if that process dies."""
        return bool(self.conn.set(keys.gateway_finalize_lock_key(batch_id), "1", nx=True, ex=300))

    def release_finalize(self, batch_id: str) -> None:
        self.conn.delete(keys.gateway_finalize_lock_key(batch_id))


def _record_dict(record: BatchRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in BatchRecord.__dataclass_fields__}
