"""Taking micro-batches back from workers: a draining worker's queued ones, a dead worker's all.

Shared by the balancer (which reaps dead workers) and the worker (which hands back on SIGTERM and
starts clean after a crash). The moves themselves are the atomic ``REQUEUE`` script.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from enum import StrEnum

import redis
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result as RQResult
from rq.serializers import JSONSerializer
from rq.worker import Worker

from gpulb import keys
from gpulb.connection import count_stat
from gpulb.errors import GarbageInRedis
from gpulb.logs import get_logger
from gpulb.scripts import Scripts

log = get_logger("gpulb.recovery")


class RequeueMode(StrEnum):
    RELEASE = "release"  # only micro-batches still queued (graceful stop)
    RECOVER = "recover"  # everything (the worker is dead)


@dataclass(slots=True)
class Requeued:
    requests: int = 0
    dead_lettered: int = 0
    microbatches: int = 0

    def add(self, other: Requeued) -> None:
        self.requests += other.requests
        self.dead_lettered += other.dead_lettered
        self.microbatches += other.microbatches


def requeue_microbatch(
    conn: redis.Redis, scripts: Scripts, worker_id: str, microbatch_id: str, *,
    mode: RequeueMode, max_attempts: int, reason: str,
) -> tuple[Requeued, bool]:  # fmt: skip
    """Requeue one micro-batch; returns what moved and whether it was still queued (never started)."""
    raw: list[str | None] = conn.hmget(keys.microbatch_key(microbatch_id), ["entries", "model"])  # type: ignore[assignment]
    entries, model = raw
    if entries is None or model is None:
        return Requeued(), False
    batch_ids = list(dict.fromkeys(_batch_ids(entries)))  # a member that is not ours is dropped by the script
    try:
        reply = scripts.requeue(
            microbatch_id=microbatch_id, worker_id=worker_id, model=model, batch_ids=batch_ids,
            only_if_queued=mode is RequeueMode.RELEASE, now=time.time(), max_attempts=max_attempts, reason=reason,
        )  # fmt: skip
    except GarbageInRedis as refusal:
        log.error("cannot requeue a micro-batch: garbage in redis", microbatch_id=microbatch_id, key=refusal.key,
                  problem=refusal.what)  # fmt: skip
        count_stat(conn, "garbage_keys")
        return Requeued(), False
    moved = reply.requeued + reply.dead_lettered > 0 or reply.was_queued
    return Requeued(reply.requeued, reply.dead_lettered, 1 if moved else 0), reply.was_queued


def _batch_ids(entries: str) -> list[str]:
    ids = []
    for member in entries.split():
        with contextlib.suppress(ValueError):
            ids.append(keys.parse_ingress_member(member).batch_id)
    return ids


def recover_worker(
    conn: redis.Redis, rq_conn: redis.Redis, scripts: Scripts, worker_id: str, *,
    max_attempts: int, keep: frozenset[str] = frozenset(), only: frozenset[str] | None = None,
) -> Requeued:  # fmt: skip
    """Put back every micro-batch ``worker_id`` holds (except ``keep``; of ``only``, if given) and clean RQ's
    records of them."""
    total = Requeued()
    reason = f"worker {worker_id} died while running this request {max_attempts} times"
    inflight: set[str] = conn.smembers(keys.inflight_key(worker_id))  # type: ignore[assignment]
    if only is not None:
        inflight &= only
    for microbatch_id in sorted(inflight - keep):
        moved, was_queued = requeue_microbatch(
            conn, scripts, worker_id, microbatch_id, mode=RequeueMode.RECOVER, max_attempts=max_attempts, reason=reason
        )
        total.add(moved)
        if not was_queued:
            _fail_rq_job(rq_conn, worker_id, microbatch_id, f"worker {worker_id} died; gpulb requeued the requests")
    return total


def _fail_rq_job(rq_conn: redis.Redis, worker_id: str, job_id: str, reason: str) -> None:
    """Keep RQ's registries truthful: the started job of a dead worker becomes a failed job."""
    try:
        job = Job.fetch(job_id, connection=rq_conn, serializer=JSONSerializer)
    except NoSuchJobError:
        return
    queue = keys.rq_queue_name(worker_id)
    if job.get_status(refresh=False) == JobStatus.FINISHED:  # it admitted its requests into the engine, then died
        FinishedJobRegistry(queue, connection=rq_conn, serializer=JSONSerializer).remove(job)
    else:
        registry = StartedJobRegistry(queue, connection=rq_conn, serializer=JSONSerializer)
        with contextlib.suppress(ValueError):  # RQ: "Execution ... not found": its worker cleaned it up meanwhile
            registry.remove_executions(job)
    record_rq_failure(rq_conn, job, worker_id, reason)


def record_rq_failure(rq_conn: redis.Redis, job: Job, worker_id: str, reason: str) -> None:
    """Fail ``job`` in RQ's books (status, failed registry, result stream) without running or decoding it."""
    pipe = rq_conn.pipeline()
    pipe.lrem(keys.rq_intermediate_key(worker_id), 0, job.id)
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    ttl = job.failure_ttl or DEFAULT_FAILURE_TTL
    FailedJobRegistry(keys.rq_queue_name(worker_id), connection=rq_conn, serializer=JSONSerializer).add(
        job, ttl=ttl, exc_string=reason, pipeline=pipe
    )
    RQResult.create_failure(job, ttl, reason, worker_name=worker_id, pipeline=pipe)
    pipe.execute()


def retire_rq_worker(rq_conn: redis.Redis, worker_id: str) -> None:
    """Mark a dead worker's RQ record dead, so ``rq info`` stops listing it and its id can be reused."""
    worker_key = Worker.redis_worker_namespace_prefix + worker_id
    if rq_conn.exists(worker_key) and not rq_conn.hexists(worker_key, "death"):
        dead = Worker.find_by_key(worker_key, connection=rq_conn, serializer=JSONSerializer)
        if dead is not None:
            dead.register_death()  # type: ignore[no-untyped-call]


def reap_dead_workers(
    conn: redis.Redis, rq_conn: redis.Redis, scripts: Scripts, dead_ids: list[str], *, max_attempts: int
) -> Requeued:
    """For workers whose load key expired: take their work back, forget them."""
    total = Requeued()
    for worker_id in dead_ids:
        if conn.exists(keys.load_key(worker_id)):
            continue  # it came back since we looked
        moved = recover_worker(conn, rq_conn, scripts, worker_id, max_attempts=max_attempts)
        conn.srem(keys.workers_key(), worker_id)
        retire_rq_worker(rq_conn, worker_id)
        total.add(moved)
        log.warning("reaped dead worker", worker_id=worker_id, requeued=moved.requests,
                    dead_lettered=moved.dead_lettered, microbatches=moved.microbatches)  # fmt: skip
    return total
