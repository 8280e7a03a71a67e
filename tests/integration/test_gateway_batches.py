"""The gateway's batch service on a real redis-server: expiry after the completion window, cancel races."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from gpulb import keys
from gpulb.cli.batch import run_submit
from gpulb.cli.main import build_parser
from gpulb.settings import Settings
from producer import Client
from producer.gateway.batches import BatchService
from producer.gateway.store import EVERYONE, BatchRecords, FileStore
from tests.conftest import make_settings


def service(redis_url: str, settings: Settings | None = None) -> tuple[BatchService, Client]:
    settings = settings or make_settings(redis_url)
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


class TestDefaultMaxTokens:
    def test_a_body_without_max_tokens_gets_the_same_default_through_the_gateway_and_gpulb_submit(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        """One setting (GPULB_PRODUCER__DEFAULT_MAX_TOKENS) for every OpenAI body: it was 256 in gpulb submit and
        1024 in the gateway."""
        settings = make_settings(redis_url, producer={"default_max_tokens": 77})
        svc, client = service(redis_url, settings)
        line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                           "body": {"model": "m", "prompt": "p"}})  # fmt: skip
        uploaded = svc.files.put(line.encode(), filename="in.jsonl", purpose="batch", tenant="").id
        record = svc.create(input_file_id=uploaded, endpoint="/v1/completions", completion_window="24h",
                            metadata=None, tenant=EVERYONE)  # fmt: skip
        source = tmp_path / "in.jsonl"
        source.write_text(line + "\n")
        args = build_parser(settings).parse_args(["submit", str(source), "--detach"])
        assert args.max_tokens is None
        assert run_submit(args, settings) == 0
        batches = [b.batch_id for b in client.list_batches()]
        assert record.gpulb_batch in batches and len(batches) == 2
        payloads = [json.loads(client._conn.hget(keys.batch_requests_key(b), "0") or "{}") for b in batches]
        assert [p["max_tokens"] for p in payloads] == [77, 77]
        client.close()
