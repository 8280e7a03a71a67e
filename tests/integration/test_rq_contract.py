"""gpulb's RQ worker keeps RQ's books as RQ's own worker does: the same job, run once by RQ's ``SimpleWorker`` and
once by ``GpulbWorker``, leaves the same ``rq:*`` keys, of the same types and shapes, in the same registries."""

from __future__ import annotations

import re
from typing import Any

import redis
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from gpulb import keys
from producer import Client
from tests.integration.conftest import StartWorker, balancer, work
from worker.jobs import CURRENT_EXECUTION
from worker.main import WorkerParts

Books = dict[str, tuple[str, object]]
ID = re.compile(r"mb-[0-9a-f]{16}|[0-9a-f]{32}|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")  # job and execution ids


def normalised(raw: bytes | str) -> str:
    return ID.sub("ID", raw.decode() if isinstance(raw, bytes) else raw)


def books(redis_url: str) -> Books:
    """Every ``rq:*`` key, ids normalised: its type and shape (hash field names, set and sorted-set members, list
    items, stream entry field names), and a job's status."""
    conn: Any = redis.Redis.from_url(redis_url)  # bytes: a job hash holds compressed data
    found: Books = {}
    for key in sorted(conn.keys("rq:*")):
        kind = conn.type(key).decode()
        found[normalised(key)] = (kind, _shape(conn, key, kind))
    return found


def _shape(conn: Any, key: bytes, kind: str) -> object:  # Any: redis-py types replies as bytes or str
    if kind == "hash":
        fields = conn.hgetall(key)
        status = fields.get(b"status") if key.startswith(keys.RQ_JOB_PREFIX.encode()) else None
        return sorted(normalised(f) for f in fields), status
    if kind == "set":
        return sorted(normalised(m) for m in conn.smembers(key))
    if kind == "zset":
        return sorted(normalised(m) for m in conn.zrange(key, 0, -1))
    if kind == "list":
        return [normalised(item) for item in conn.lrange(key, 0, -1)]
    if kind == "stream":
        return [sorted(normalised(f) for f in fields) for _, fields in conn.xrange(key)]
    return None


class RqsOwnWorker(SimpleWorker):
    """RQ's own SimpleWorker, its books untouched. Only its command channel is polled every second instead of every
    60 s: with redis-py >= 8.2 its teardown waits for that poll, and by then the worker hash it leaves (60 s after
    its death) may have expired."""

    def subscribe(self) -> None:
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=1, daemon=True)  # type: ignore[assignment]


def run_with_rqs_own_worker(worker: WorkerParts, redis_url: str) -> None:
    """RQ's own SimpleWorker, in burst mode, runs the queued job as it would any job (the job function finds the
    worker's micro-batch execution through RQ's entry, worker.jobs.run_microbatch)."""
    rq_conn = redis.Redis.from_url(redis_url)
    worker_id = worker.ctx.worker_id
    queue = Queue(worker_id, connection=rq_conn, serializer=JSONSerializer)
    token = CURRENT_EXECUTION.set(worker.execution)
    try:
        RqsOwnWorker([queue], name=worker_id, connection=rq_conn, serializer=JSONSerializer).work(burst=True)
    finally:
        CURRENT_EXECUTION.reset(token)
    assert worker.engine.finish_in_flight(timeout_s=60), "requests still in the engine after 60 s"


def one_job_run(conn: redis.Redis, client: Client, start_worker: StartWorker, run: object, redis_url: str) -> Books:
    conn.flushall()
    runtime = start_worker("w1")
    batch = client.submit_batch(["a", "b"], model="m")
    assert balancer(conn).dispatch_round() == 2
    run(runtime, redis_url)  # type: ignore[operator]
    assert all(r.ok for r in batch.results(timeout=5))
    return books(redis_url)


class TestRqContract:
    def test_gpulb_worker_writes_what_rqs_own_worker_writes(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        theirs = one_job_run(conn, client, start_worker, run_with_rqs_own_worker, redis_url)
        ours = one_job_run(conn, client, start_worker, work, redis_url)
        assert ours == theirs
        assert theirs[f"{keys.RQ_JOB_PREFIX}ID"][1][1] == b"finished"  # type: ignore[index]
        assert theirs["rq:finished:w1"] == ("zset", ["ID"])
