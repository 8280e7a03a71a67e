"""The balancer loop: wake on new work or freed capacity, place micro-batches, repeat."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
import structlog
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from balancer.fleet import Backlog, read_fleet
from balancer.policy import WorkerView, batch_budget, choose_least_time
from gpulb import keys
from gpulb.connection import CONNECTION_ERRORS
from gpulb.logs import get_logger
from gpulb.recovery import reap_dead_workers
from gpulb.scripts import Scripts, as_ints
from gpulb.settings import Settings

log = get_logger("gpulb.balancer")

DISPATCHED, EMPTY, NOT_ACCEPTING, NO_CREDIT = 1, 0, -1, -2
BALANCER_HEARTBEAT_TTL_S = 10


@dataclass(frozen=True, slots=True)
class Dispatch:
    status: int
    requests: int
    tokens: int
    next_cost: int
    dropped: int


class Balancer:
    """Places requests from per-model ingresses onto per-worker RQ queues."""

    def __init__(
        self,
        conn: redis.Redis,
        rq_conn: redis.Redis,
        settings: Settings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.conn, self.rq_conn = conn, rq_conn
        self.max_attempts = settings.max_attempts
        self.max_backoff_s = settings.redis.max_backoff_s
        self.settings = settings.balancer
        self.scripts = Scripts(conn)
        self.rng = rng or random.Random()
        self.stop_event = threading.Event()
        self.dispatched_requests = 0
        self.dispatched_batches = 0
        self._last_beat = 0.0

    def run(self) -> None:
        """Dispatch until :meth:`stop`; block on the wake-up list whenever nothing can move."""
        structlog.contextvars.bind_contextvars(role="balancer")
        log.info(
            "balancer started",
            batch_target_s=self.settings.batch_target_s,
            max_outstanding_batches=self.settings.max_outstanding_batches,
        )
        delay = 0.1
        while not self.stop_event.is_set():
            try:
                self._beat()
                if self.dispatch_round() == 0:
                    self._wait_for_wakeup()
                delay = 0.1
            except CONNECTION_ERRORS as exc:  # Redis restarting or unreachable: back off, keep going
                log.warning("redis unavailable", error=str(exc), retry_in_s=delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)
        with contextlib.suppress(*CONNECTION_ERRORS):
            self.conn.delete(keys.balancer_heartbeat_key())
        log.info("balancer stopped", requests=self.dispatched_requests, micro_batches=self.dispatched_batches)

    def stop(self) -> None:
        self.stop_event.set()

    def _beat(self) -> None:
        """Refresh the balancer's presence key (at most once a second) for ``gpulb status``."""
        now = time.time()
        if now - self._last_beat < 1.0:
            return
        self._last_beat = now
        record = {"host": socket.gethostname(), "pid": os.getpid(), "ts": now,
                  "requests": self.dispatched_requests, "micro_batches": self.dispatched_batches}  # fmt: skip
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(keys.balancer_heartbeat_key(), mapping=record)  # type: ignore[arg-type]
        pipe.expire(keys.balancer_heartbeat_key(), BALANCER_HEARTBEAT_TTL_S)
        pipe.execute()

    def _wait_for_wakeup(self) -> None:
        timeout = self.settings.idle_wake_s
        if self.conn.blpop([keys.wakeup_key()], timeout=timeout) is not None:
            self.conn.delete(keys.wakeup_key())  # one round covers every change signalled so far

    def dispatch_round(self) -> int:
        """Place as much as credit allows, for every model; returns requests dispatched."""
        fleet = read_fleet(self.conn)
        if fleet.dead:
            reaped = reap_dead_workers(
                self.conn, self.rq_conn, self.scripts, fleet.dead, max_attempts=self.max_attempts
            )
            if reaped.requests:
                fleet = read_fleet(self.conn)  # the backlog just grew
        return sum(
            self._dispatch_model(model, workers, fleet.backlog[model])
            for model, workers in fleet.by_model.items()
            if fleet.backlog[model].head_cost >= 0
        )

    def _dispatch_model(self, model: str, workers: list[WorkerView], backlog: Backlog) -> int:
        s = self.settings
        placed = 0
        while backlog.head_cost >= 0:
            chosen = choose_least_time(
                workers,
                backlog.head_cost,
                max_outstanding=s.max_outstanding_batches,
                prior_tokens_per_s=s.prior_tokens_per_s,
                rng=self.rng,
            )
            if chosen is None:
                break
            budget = batch_budget(
                chosen,
                workers,
                backlog_tokens=backlog.tokens,
                head_cost=backlog.head_cost,
                batch_target_s=s.batch_target_s,
                prior_tokens_per_s=s.prior_tokens_per_s,
            )
            result = self.dispatch(chosen, budget)
            if result.status == EMPTY:
                break
            if result.status in (NOT_ACCEPTING, NO_CREDIT):  # our snapshot was stale: fix it, choose again
                chosen.accepting = result.status == NO_CREDIT
                chosen.outstanding_batches = max(chosen.outstanding_batches, s.max_outstanding_batches)
                continue
            chosen.outstanding_batches += 1
            chosen.outstanding_tokens += result.tokens
            backlog.tokens = max(0, backlog.tokens - result.tokens)
            backlog.head_cost = result.next_cost
            placed += result.requests
        return placed

    def dispatch(self, worker: WorkerView, token_budget: int) -> Dispatch:
        """Atomically cut a micro-batch for ``worker`` and enqueue it as one RQ job."""
        microbatch_id = f"mb-{secrets.token_hex(8)}"
        reply = self.scripts.dispatch(
            keys=[
                keys.ingress_key(worker.model),
                keys.ingress_tokens_key(worker.model),
                keys.load_key(worker.worker_id),
                keys.credit_key(worker.worker_id),
                keys.inflight_key(worker.worker_id),
                keys.microbatch_key(microbatch_id),
                keys.rq_job_key(microbatch_id),
                keys.rq_queue_key(worker.worker_id),
                keys.rq_queues_key(),
            ],
            args=[
                microbatch_id,
                worker.worker_id,
                worker.model,
                worker.capacity,
                token_budget,
                self.settings.max_outstanding_batches,
                time.time(),
                keys.rq_queue_key(worker.worker_id),
                *self._rq_job_fields(microbatch_id, worker.worker_id),
            ],
        )
        result = Dispatch(*as_ints(reply))
        if result.dropped:
            log.warning("dropped foreign ingress members", model=worker.model, count=result.dropped)
            self.conn.hincrby(keys.stats_key(), "dropped_ingress_members", result.dropped)
        if result.status == DISPATCHED:
            self.dispatched_requests += result.requests
            self.dispatched_batches += 1
            log.debug(
                "dispatched",
                worker_id=worker.worker_id,
                microbatch_id=microbatch_id,
                requests=result.requests,
                tokens=result.tokens,
                budget=token_budget,
            )
        return result

    def _rq_job_fields(self, microbatch_id: str, worker_id: str) -> list[str | bytes]:
        """The RQ job hash, exactly as RQ's own ``Job.save`` would write it (JSON serializer)."""
        job = Job.create(
            keys.JOB_FUNC,
            args=[microbatch_id],
            id=microbatch_id,
            connection=self.conn,
            serializer=JSONSerializer,
            origin=keys.rq_queue_name(worker_id),
            timeout=self.settings.job_timeout_s,
            result_ttl=self.settings.job_result_ttl_s,
            description=f"gpulb micro-batch {microbatch_id} for {worker_id}",
            status=JobStatus.QUEUED,
        )
        job.enqueued_at = datetime.now(UTC)
        fields: list[str | bytes] = []
        for name, value in job.to_dict().items():
            if value is not None:
                fields += [name, value if isinstance(value, bytes | str) else str(value)]
        return fields
