"""The balancer's picture of the fleet: one pipelined full read now and then, cheap updates between.

A full read costs O(workers); between full reads only the workers named by wake-up tokens (those
that finished or gave back a micro-batch) are read again, so a decision does not cost O(workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from balancer.policy import WorkerView
from gpulb import keys
from gpulb.connection import count_stat
from gpulb.errors import BadPayload
from gpulb.logs import get_logger
from gpulb.models import ACCEPTING_STATES, WorkerLoad
from gpulb.records import load_from_reply, queue_load_reads

log = get_logger("gpulb.balancer")


@dataclass(slots=True)
class Backlog:
    tokens: int
    head_cost: int  # -1 when the ingress is empty
    head_affinity: str = ""
    head_owner: str = ""
    requests: int = 0


@dataclass(slots=True)
class ModelTotals:
    tokens_per_s: float = 0.0
    outstanding_tokens: int = 0
    capacity_requests: int = 0  # what the model's continuous workers may hold at once: a backlog below it is a tail


@dataclass(slots=True)
class Fleet:
    views: dict[str, WorkerView] = field(default_factory=dict)
    by_model: dict[str, list[WorkerView]] = field(default_factory=dict)
    totals: dict[str, ModelTotals] = field(default_factory=dict)
    backlog: dict[str, Backlog] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)  # registered, but no load key: heartbeat expired
    malformed: int = 0
    prior_tokens_per_s: float = 1000.0
    max_outstanding: int = 2
    # per model, the workers that can take a micro-batch now: large fleets are sampled from here
    available: dict[str, dict[str, WorkerView]] = field(default_factory=dict)

    def add(self, view: WorkerView) -> None:
        self.views[view.worker_id] = view
        self.by_model.setdefault(view.model, []).append(view)
        self._count(view, +1)

    def update(self, view: WorkerView, load: WorkerLoad, credit: dict[str, str]) -> None:
        self._count(view, -1)
        _apply(view, load, credit)
        self._count(view, +1)

    def dispatched(self, view: WorkerView, requests: int, tokens: int) -> None:
        self._count(view, -1)
        view.outstanding_batches += 1
        view.outstanding_tokens += tokens
        view.outstanding_requests += requests
        self._count(view, +1)

    def refused(self, view: WorkerView, *, gone: bool, max_outstanding: int) -> None:
        """The dispatch script refused: our picture was stale (worker left, or full)."""
        self._count(view, -1)
        view.accepting = not gone
        view.outstanding_batches = max(view.outstanding_batches, max_outstanding)
        view.outstanding_requests = max(view.outstanding_requests, view.slots + view.queue_slots)
        self._count(view, +1)

    def _count(self, view: WorkerView, sign: int) -> None:
        available = self.available.setdefault(view.model, {})
        if sign > 0 and view.accepting and view.has_credit(self.max_outstanding):
            available[view.worker_id] = view
        else:
            available.pop(view.worker_id, None)
        if not view.accepting:
            return
        totals = self.totals.setdefault(view.model, ModelTotals())
        totals.tokens_per_s += sign * view.speed(self.prior_tokens_per_s)
        totals.outstanding_tokens += sign * view.outstanding_tokens
        totals.capacity_requests += sign * (view.slots + view.queue_slots)


def read_fleet(
    conn: redis.Redis, prior_tokens_per_s: float, max_outstanding: int, *, with_owners: bool = False
) -> Fleet:
    """Every registered worker's load and credit, and every served model's backlog."""
    worker_ids: list[str] = sorted(conn.smembers(keys.workers_key()))  # type: ignore[arg-type]
    fleet = Fleet(prior_tokens_per_s=prior_tokens_per_s, max_outstanding=max_outstanding)
    for worker_id, load_reply, credit in _read_workers(conn, worker_ids):
        if not load_reply:
            fleet.dead.append(worker_id)
            continue
        load = _parse(worker_id, load_reply, fleet)
        if load is not None:
            view = WorkerView(worker_id, load.model, load.capacity, load.tokens_per_s, slots=load.slots,
                              queue_slots=load.queue_slots)  # fmt: skip
            _apply(view, load, credit)
            fleet.add(view)
    if fleet.malformed:
        count_stat(conn, "malformed_load_keys", fleet.malformed)
    read_backlogs(conn, fleet, with_owners=with_owners)
    return fleet


def refresh_workers(conn: redis.Redis, fleet: Fleet, worker_ids: set[str]) -> bool:
    """Re-read only these workers; False when a full read is needed (a worker unknown or gone)."""
    for worker_id, load_reply, credit in _read_workers(conn, sorted(worker_ids)):
        view = fleet.views.get(worker_id)
        load = _parse(worker_id, load_reply, fleet) if load_reply else None
        if view is None or load is None or load.model != view.model:
            return False
        fleet.update(view, load, credit)
    return True


def read_backlogs(conn: redis.Redis, fleet: Fleet, *, with_owners: bool = False) -> None:
    models = list(fleet.by_model)
    pipe = conn.pipeline(transaction=False)
    queue_backlog_reads(pipe, models)
    apply_backlogs(conn, fleet, models, pipe.execute(), with_owners=with_owners)


def queue_backlog_reads(pipe: redis.client.Pipeline, models: list[str]) -> None:
    """Queue the reads of these models' backlogs on ``pipe`` (three replies per model)."""
    for model in models:
        pipe.get(keys.ingress_tokens_key(model))
        pipe.zrange(keys.ingress_key(model), 0, 0)
        pipe.get(keys.ingress_requests_key(model))


def apply_backlogs(
    conn: redis.Redis, fleet: Fleet, models: list[str], replies: list[Any], *, with_owners: bool = False
) -> None:
    """Set the backlogs from the replies of :func:`queue_backlog_reads`."""
    for i, model in enumerate(models):
        tokens, head, requests = replies[3 * i : 3 * i + 3]
        cost, affinity = _head(head[0]) if head else (-1, "")
        fleet.backlog[model] = Backlog(tokens=max(0, _int(tokens)), head_cost=cost, head_affinity=affinity,
                                       requests=max(0, _int(requests)))  # fmt: skip
    if with_owners:
        _read_owners(conn, fleet)


def _read_owners(conn: redis.Redis, fleet: Fleet) -> None:
    waiting = [(m, b) for m, b in fleet.backlog.items() if b.head_affinity]
    pipe = conn.pipeline(transaction=False)
    for model, backlog in waiting:
        pipe.hget(keys.affinity_key(model), backlog.head_affinity)
    for (_, backlog), owner in zip(waiting, pipe.execute(), strict=True):
        backlog.head_owner = owner or ""


def _read_workers(conn: redis.Redis, worker_ids: list[str]) -> list[tuple[str, Any, dict[str, str]]]:
    """Each worker's load reply (for :func:`gpulb.records.load_from_reply`) and credit, in one round trip."""
    pipe = conn.pipeline(transaction=False)
    queue_load_reads(pipe, worker_ids)
    for worker_id in worker_ids:
        pipe.hgetall(keys.credit_key(worker_id))
    replies, count = pipe.execute(raise_on_error=False), len(worker_ids)
    return [(w, replies[i], _hash_or_garbage(replies[count + i])) for i, w in enumerate(worker_ids)]


GARBAGE_HASH = {"state": "garbage: not a hash"}  # a credit key of another type: its worker takes no work


def _hash_or_garbage(reply: Any) -> dict[str, str]:
    if isinstance(reply, redis.ResponseError):
        if "WRONGTYPE" not in str(reply):
            raise reply
        return GARBAGE_HASH
    return reply  # type: ignore[no-any-return]


def _parse(worker_id: str, load_reply: Any, fleet: Fleet) -> WorkerLoad | None:
    """The worker's load; None, counted and logged, when its load key holds garbage."""
    try:
        return load_from_reply(load_reply)
    except BadPayload as exc:
        fleet.malformed += 1
        log.warning("skipping worker with a malformed load key", worker_id=worker_id, error=str(exc))
        return None


def _apply(view: WorkerView, load: WorkerLoad, credit: dict[str, str]) -> None:
    view.capacity, view.tokens_per_s = load.capacity, load.tokens_per_s
    view.slots, view.queue_slots = load.slots, load.queue_slots
    view.accepting = load.state in ACCEPTING_STATES and credit is not GARBAGE_HASH
    try:
        view.outstanding_batches = int(credit.get("batches", 0))
        view.outstanding_tokens = int(credit.get("tokens", 0))
        view.outstanding_requests = int(credit.get("requests", 0))
    except ValueError:
        view.accepting = False  # garbage credit: do not use this worker until it is sane again


def _int(raw: str | None) -> int:
    """A counter's value; garbage reads as 0 (the dispatch script keeps the real one)."""
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def _head(member: str) -> tuple[int, str]:
    try:
        parsed = keys.parse_ingress_member(member)
    except ValueError:
        return 0, ""  # a foreign member: the dispatch script drops it
    return parsed.costs[0], parsed.affinity
