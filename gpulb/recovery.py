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

from gpulb import keys, rq_books
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
            rq_books.fail_started_job(
                rq_conn, worker_id, microbatch_id, f"worker {worker_id} died; gpulb requeued the requests"
            )
    return total


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
        rq_books.retire_worker(rq_conn, worker_id)
        total.add(moved)
        log.warning("reaped dead worker", worker_id=worker_id, requeued=moved.requests,
                    dead_lettered=moved.dead_lettered, microbatches=moved.microbatches)  # fmt: skip
    return total
