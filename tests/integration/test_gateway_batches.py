"""The gateway's batch service on a real redis-server: expiry after the completion window, cancel races."""

from __future__ import annotations

import json

import redis

from producer import Client
from producer.gateway.batches import BatchService
from producer.gateway.store import EVERYONE, BatchRecords, FileStore
from tests.conftest import make_settings


def service(redis_url: str) -> tuple[BatchService, Client]:
    settings = make_settings(redis_url)
    client = Client(redis_url, settings=settings)
    files = FileStore(redis.Redis.from_url(redis_url), 1 << 20, 3600)
    return BatchService(client, files, BatchRecords(client._conn), settings), client


def upload(svc: BatchService, count: int) -> str:
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "m", "prompt": "p", "max_tokens": 1}}) for i in range(count)]  # fmt: skip
    return svc.files.put("\n".join(lines).encode(), filename="in.jsonl", purpose="batch", tenant="").id


class TestExpiry:
    def test_a_batch_past_its_window_expires_with_its_requests_in_the_error_file(self, redis_url: str) -> None:
        svc, client = service(redis_url)
        record = svc.create(input_file_id=upload(svc, 3), endpoint="/v1/completions", completion_window="24h",
                            metadata=None, tenant=EVERYONE)  # fmt: skip
        record.created_at -= 25 * 3600  # no worker ever came, and the window has closed
        svc.records.save(record)
        expired = svc.get(record.id, EVERYONE)
        assert expired.status == "expired" and expired.output_file_id is None
        assert expired.counts == {"total": 3, "completed": 0, "failed": 3}
        errors = [json.loads(x) for x in svc.files.content(expired.error_file_id or "", EVERYONE).decode().splitlines()]
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(f"r{i}", "batch_expired") for i in range(3)]
        assert svc.records.active() == []
        client.close()


class TestCancelRace:
    def test_a_cancel_after_the_batch_finished_is_refused_and_changes_nothing(self, redis_url: str) -> None:
        svc, client = service(redis_url)
        record = svc.create(input_file_id=upload(svc, 2), endpoint="/v1/completions", completion_window="24h",
                            metadata=None, tenant=EVERYONE)  # fmt: skip
        stale = svc.records.get(record.id, EVERYONE)  # a cancel read this ...
        client.get_batch(record.gpulb_batch).cancel()
        final = svc.get(record.id, EVERYONE)  # ... then the finalizer finished the batch
        assert final.status == "cancelled"
        stale.status = "cancelling"
        assert not svc.records.save(stale, unless_final=True)  # the stale copy cannot overwrite it
        assert (
            svc.records.get(record.id, EVERYONE).status == "cancelled"
            and svc.records.get(record.id, EVERYONE).error_file_id
        )
        client.close()
