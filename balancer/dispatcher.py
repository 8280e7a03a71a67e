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
from typing import Any

import redis
import structlog

from balancer.fleet import (
    Backlog,
    Fleet,
    ModelTotals,
    apply_backlogs,
    queue_backlog_reads,
    read_fleet,
    refresh_workers,
)
from balancer.metrics import BalancerMetrics
from balancer.policy import UNBOUNDED, Context, Head, Policy, WorkerView, make_policy
from gpulb import keys
from gpulb.connection import CONNECTION_ERRORS, REDIS_FULL, count_stat
from gpulb.errors import BadPayload, GarbageInRedis
from gpulb.logs import get_logger
from gpulb.recovery import reap_dead_workers
from gpulb.rq_books import RqJobTemplate
from gpulb.scripts import Scripts
from gpulb.settings import Settings

log = get_logger("gpulb.balancer")

DISPATCHED, EMPTY, NOT_ACCEPTING, NO_CREDIT, OTHER_AFFINITY = 1, 0, -1, -2, -3
BALANCER_HEARTBEAT_TTL_S = 10
AFFINITY_OWNERS_TTL_S = 3600
MAX_JOB_TEMPLATES = 4096


@dataclass(frozen=True, slots=True)
class Dispatch:
    status: int
    requests: int
    tokens: int
    next_cost: int
    dropped: int
    next_affinity: str = ""
    next_owner: str = ""


class Balancer:
    """Places requests from per-model ingresses onto per-worker RQ queues."""

    def __init__(
        self,
        conn: redis.Redis,
        rq_conn: redis.Redis,
        settings: Settings,
        *,
        rng: random.Random | None = None,
        policy: Policy | None = None,
        metrics: BalancerMetrics | None = None,
    ) -> None:
        self.conn, self.rq_conn = conn, rq_conn
        self.max_attempts = settings.max_attempts
        self.max_backoff_s = settings.redis.max_backoff_s
        self.settings = s = settings.balancer
        self.policy = policy or make_policy(s.policy)
        self.ctx = Context(
            rng=rng or random.Random(), batch_target_s=s.batch_target_s,
            max_outstanding=s.max_outstanding_batches if self.policy.late_binding else UNBOUNDED,
            prior_tokens_per_s=s.prior_tokens_per_s,
            affinity_abs_s=s.affinity_abs_s, affinity_rel=s.affinity_rel,
        )  # fmt: skip
        self.scripts = Scripts(conn)
        self.stop_event = threading.Event()
        self.fleet: Fleet | None = None
        self._fleet_read_at = 0.0
        self._changed: set[str] = set()
        self.metrics = metrics
        self.dispatched_requests = 0
        self.dispatched_batches = 0
        self._last_beat = 0.0
        self._job_templates: dict[str, RqJobTemplate] = {}

    def run(self) -> None:
        """Dispatch until :meth:`stop`; block on the wake-up list whenever nothing can move."""
        structlog.contextvars.bind_contextvars(role="balancer")
        log.info("balancer started", policy=self.policy.name, batch_target_s=self.settings.batch_target_s,
                 max_outstanding_batches=self.ctx.max_outstanding)  # fmt: skip
        delay = 0.1
        while not self.stop_event.is_set():
            try:
                self._beat()
                if self.dispatch_round() == 0 or self._backlogs_empty():
                    self._wait_for_wakeup()
                delay = 0.1
            except CONNECTION_ERRORS as exc:  # Redis restarting or unreachable: back off, keep going
                log.warning("redis unavailable", error=str(exc), retry_in_s=delay)
                delay = self._back_off(delay)
            except REDIS_FULL:  # nothing can move until memory is freed: back off, resume by itself
                log.warning("redis is full (maxmemory, noeviction): waiting for memory", retry_in_s=delay)
                count_stat(self.conn, "redis_full")
                delay = self._back_off(delay)
            except (redis.ResponseError, BadPayload) as exc:  # garbage the checks below missed: never stop
                log.error("unexpected reply from redis: skipped", error=str(exc), retry_in_s=delay)
                count_stat(self.conn, "unexpected_replies")
                delay = self._back_off(delay)
        with contextlib.suppress(*CONNECTION_ERRORS):
            self.conn.delete(keys.balancer_heartbeat_key())
        log.info("balancer stopped", requests=self.dispatched_requests, micro_batches=self.dispatched_batches)

    def stop(self) -> None:
        self.stop_event.set()

    def _back_off(self, delay: float) -> float:
        """Wait ``delay`` (a stop cuts it short), forget the snapshot; the next, longer delay."""
        self.fleet = None
        self.stop_event.wait(delay)
        return min(delay * 2, self.max_backoff_s)

    def _beat(self) -> None:
        """Refresh the balancer's presence key (at most once a second) for ``gpulb status``."""
        now = time.time()
        if now - self._last_beat < 1.0:
            return
        self._last_beat = now
        record = {"host": socket.gethostname(), "pid": os.getpid(), "ts": now, "policy": self.policy.name,
                  "requests": self.dispatched_requests, "micro_batches": self.dispatched_batches}  # fmt: skip
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(keys.balancer_heartbeat_key(), mapping=record)  # type: ignore[arg-type]
        pipe.expire(keys.balancer_heartbeat_key(), BALANCER_HEARTBEAT_TTL_S)
        pipe.execute()

    def _wait_for_wakeup(self) -> None:
        """Block until something changed (a token arrives); the next round reads the rest."""
        popped = self.conn.blpop([keys.wakeup_key()], timeout=self.settings.idle_wake_s)
        if popped is not None:
            self._changed.add(str(popped[1]))

    def _backlogs_empty(self) -> bool:
        """Nothing waits in any ingress (as the dispatch replies said): only a wake-up can bring work."""
        return self.fleet is not None and all(b.head_cost < 0 for b in self.fleet.backlog.values())

    # -- one round ------------------------------------------------------------------------------

    def dispatch_round(self) -> int:
        """Place as much as the policy allows, for every model; returns requests dispatched."""
        fleet = self._snapshot()
        return sum(
            self._dispatch_model(workers, fleet, fleet.backlog[model])
            for model, workers in fleet.by_model.items()
            if fleet.backlog[model].head_cost >= 0
        )

    def _snapshot(self) -> Fleet:
        """A full read at most every ``snapshot_refresh_s``; between, re-read only changed workers.

        Between full reads, the wake-up tokens are taken and the backlogs read in one round trip.
        """
        fresh = self.fleet is not None and time.monotonic() - self._fleet_read_at < self.settings.snapshot_refresh_s
        models = list(self.fleet.by_model) if fresh and self.fleet is not None else []
        pipe = self.conn.pipeline(transaction=True)
        pipe.lrange(keys.wakeup_key(), 0, -1)
        pipe.delete(keys.wakeup_key())
        queue_backlog_reads(pipe, models)
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], redis.ResponseError):  # not a list: the MULTI deleted it, tokens are only hints
            log.warning("dropped garbage at the wake-up list", error=str(replies[0]))
            count_stat(self.conn, "garbage_keys")
            replies[0] = []
        _raise_first_error(replies)
        changed, self._changed = self._changed | set(replies[0]), set()
        workers = {t.removeprefix(keys.WAKE_WORKER) for t in changed if t.startswith(keys.WAKE_WORKER)}
        fleet = self.fleet
        if fresh and fleet is not None and workers <= fleet.views.keys() and refresh_workers(self.conn, fleet, workers):
            apply_backlogs(self.conn, fleet, models, replies[2:], with_owners=self._uses_affinity)
            return fleet
        return self._full_read()

    def _full_read(self) -> Fleet:
        prior = self.settings.prior_tokens_per_s
        fleet = read_fleet(self.conn, prior, self.ctx.max_outstanding, with_owners=self._uses_affinity)
        if fleet.dead:
            reaped = reap_dead_workers(
                self.conn, self.rq_conn, self.scripts, fleet.dead, max_attempts=self.max_attempts
            )
            if self.metrics is not None:
                self.metrics.reaped.inc(len(fleet.dead))
                self.metrics.recovered.inc(reaped.requests)
            if reaped.requests:
                fleet = read_fleet(
                    self.conn, prior, self.ctx.max_outstanding, with_owners=self._uses_affinity
                )  # the backlog just grew
        self.fleet, self._fleet_read_at = fleet, time.monotonic()
        return fleet

    def _dispatch_model(self, workers: list[WorkerView], fleet: Fleet, backlog: Backlog) -> int:
        placed = 0
        while backlog.head_cost >= 0:
            totals = fleet.totals.setdefault(workers[0].model, ModelTotals())
            head = Head(backlog.head_cost, backlog.tokens, backlog.head_affinity, backlog.head_owner,
                        totals.tokens_per_s, totals.outstanding_tokens, backlog.requests)  # fmt: skip
            self.ctx.available = list(fleet.available.get(workers[0].model, {}).values())
            started = time.perf_counter()
            choice = self.policy.choose(workers, head, self.ctx)
            if choice is None:
                break
            tail = self.policy.late_binding and 0 < backlog.requests <= totals.capacity_requests
            result = self.dispatch(choice.worker, choice.token_budget, respect_affinity=choice.respect_affinity,
                                   free_owners=choice.free_owners, max_requests=choice.max_requests,
                                   longest_first=tail)  # fmt: skip
            if self.metrics is not None:
                self.metrics.decision.labels(self.policy.name).observe(time.perf_counter() - started)
            if result.status in (EMPTY, OTHER_AFFINITY):
                break
            if result.status in (NOT_ACCEPTING, NO_CREDIT):  # our snapshot was stale: fix it, choose again
                fleet.refused(
                    choice.worker, gone=result.status == NOT_ACCEPTING, max_outstanding=self.ctx.max_outstanding
                )
                continue
            fleet.dispatched(choice.worker, result.requests, result.tokens)
            backlog.tokens = max(0, backlog.tokens - result.tokens)
            backlog.requests = max(0, backlog.requests - result.requests)
            backlog.head_cost, backlog.head_affinity = result.next_cost, result.next_affinity
            backlog.head_owner = result.next_owner
            placed += result.requests
        return placed

    @property
    def _uses_affinity(self) -> bool:
        return self.policy.name == "prefix-affinity"

    def dispatch(
        self, worker: WorkerView, token_budget: int, *, respect_affinity: bool = False,
        free_owners: tuple[str, ...] = (), max_requests: int = 0, longest_first: bool = False,
    ) -> Dispatch:  # fmt: skip
        """Atomically cut a micro-batch for ``worker`` and enqueue it as one RQ job (``longest_first``: the
        requests expected to run longest among the front ones, for the tail of a backlog)."""
        microbatch_id = f"mb-{secrets.token_hex(8)}"
        in_slots = self.policy.late_binding and worker.slots > 0  # credit in engine slots, not micro-batches
        try:
            reply = self.scripts.dispatch(
                microbatch_id=microbatch_id, worker_id=worker.worker_id, model=worker.model,
                max_requests=max_requests or worker.capacity, token_budget=token_budget,
                max_outstanding=UNBOUNDED if in_slots else self.ctx.max_outstanding, now=time.time(),
                respect_affinity=respect_affinity, affinity_scan=self.settings.affinity_scan, free_owners=free_owners,
                owners_ttl_s=AFFINITY_OWNERS_TTL_S, credit_in_slots=in_slots, longest_first=longest_first,
                rq_job_fields=self._rq_job_fields(microbatch_id, worker.worker_id),
            )  # fmt: skip
        except GarbageInRedis as refusal:
            log.warning("worker skipped: garbage in its keys", worker_id=worker.worker_id, key=refusal.key,
                        problem=refusal.what)  # fmt: skip
            count_stat(self.conn, "garbage_keys")
            return Dispatch(NOT_ACCEPTING, 0, 0, -1, 0)
        result = Dispatch(*reply)
        if result.dropped:
            log.warning("dropped foreign ingress members", model=worker.model, count=result.dropped)
            count_stat(self.conn, "dropped_ingress_members", result.dropped)
        if result.status == DISPATCHED:
            self.dispatched_requests += result.requests
            self.dispatched_batches += 1
            if self.metrics is not None:
                self.metrics.dispatched(worker.worker_id, worker.model, result.requests, result.tokens)
        return result

    def _rq_job_fields(self, microbatch_id: str, worker_id: str) -> list[str | bytes]:
        """The RQ job hash, exactly as RQ's own ``Job.save`` would write it (JSON serializer)."""
        template = self._job_templates.get(worker_id)
        if template is None:
            if len(self._job_templates) >= MAX_JOB_TEMPLATES:  # worker ids come and go: stay bounded
                self._job_templates.clear()
            template = self._job_templates[worker_id] = RqJobTemplate(
                self.conn, worker_id, timeout_s=self.settings.job_timeout_s, result_ttl_s=self.settings.job_result_ttl_s
            )
        return template.fields_for(microbatch_id)


def _raise_first_error(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
