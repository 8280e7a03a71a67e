"""One pipelined read of every worker's load and credit, and of each model's backlog."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from balancer.policy import WorkerView
from gpulb import keys
from gpulb.errors import BadPayload
from gpulb.logs import get_logger
from gpulb.models import ACCEPTING_STATES, WorkerLoad

log = get_logger("gpulb.balancer")


@dataclass(slots=True)
class Backlog:
    tokens: int
    head_cost: int  # -1 when the ingress is empty


@dataclass(slots=True)
class Fleet:
    by_model: dict[str, list[WorkerView]] = field(default_factory=dict)
    backlog: dict[str, Backlog] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)  # registered, but no load key: heartbeat expired
    malformed: int = 0


def read_fleet(conn: redis.Redis) -> Fleet:
    worker_ids: list[str] = sorted(conn.smembers(keys.workers_key()))  # type: ignore[arg-type]
    pipe = conn.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.hgetall(keys.load_key(worker_id))
        pipe.hgetall(keys.credit_key(worker_id))
    replies = pipe.execute()
    fleet = Fleet()
    for i, worker_id in enumerate(worker_ids):
        if not replies[2 * i]:
            fleet.dead.append(worker_id)
            continue
        view = _view(worker_id, replies[2 * i], replies[2 * i + 1], fleet)
        if view is not None:
            fleet.by_model.setdefault(view.model, []).append(view)
    if fleet.malformed:
        conn.hincrby(keys.stats_key(), "malformed_load_keys", fleet.malformed)
    _read_backlogs(conn, fleet)
    return fleet


def _view(worker_id: str, load_raw: dict[str, str], credit: dict[str, str], fleet: Fleet) -> WorkerView | None:
    try:
        load = WorkerLoad.from_hash(load_raw)
        batches, tokens = int(credit.get("batches", 0)), int(credit.get("tokens", 0))
    except (BadPayload, ValueError) as exc:
        fleet.malformed += 1
        log.warning("skipping worker with a malformed load key", worker_id=worker_id, error=str(exc))
        return None
    return WorkerView(
        worker_id=worker_id,
        model=load.model,
        capacity=load.capacity,
        tokens_per_s=load.tokens_per_s,
        outstanding_batches=batches,
        outstanding_tokens=tokens,
        accepting=load.state in ACCEPTING_STATES,
    )


def _read_backlogs(conn: redis.Redis, fleet: Fleet) -> None:
    models = list(fleet.by_model)
    pipe = conn.pipeline(transaction=False)
    for model in models:
        pipe.get(keys.ingress_tokens_key(model))
        pipe.zrange(keys.ingress_key(model), 0, 0)
    replies = pipe.execute()
    for i, model in enumerate(models):
        tokens, head = replies[2 * i], replies[2 * i + 1]
        head_cost = _member_cost(head[0]) if head else -1
        fleet.backlog[model] = Backlog(tokens=max(0, int(tokens or 0)), head_cost=head_cost)


def _member_cost(member: str) -> int:
    try:
        return keys.parse_ingress_member(member)[2]
    except ValueError:
        return 0  # a foreign member: the dispatch script drops it
