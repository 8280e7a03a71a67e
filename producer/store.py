"""The producer's Redis writes: staging and publishing a batch, listing the newest, cancelling one.

Records are read through gpulb.records, shared with the other roles.
"""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import time
from collections.abc import Mapping, Sequence

import redis

from gpulb import keys
from gpulb.connection import CONNECTION_ERRORS
from gpulb.errors import GarbageInRedis
from gpulb.models import BatchState, BatchStatus, RequestSpec, Result, learned_mean_output
from gpulb.records import read_batch_statuses
from gpulb.scripts import CancelledRun, Scripts
from gpulb.settings import ProducerSettings

STAGING_TTL_S = 3600  # a batch whose submit died half-way vanishes after this; it was never visible


def new_batch_id() -> str:
    return secrets.token_hex(8)


def write_batch(
    conn: redis.Redis,
    publish_conn: redis.Redis,
    batch_id: str,
    *,
    model: str,
    priority: int,
    specs: Sequence[RequestSpec],
    limits: ProducerSettings,
    metadata: Mapping[str, str] | None = None,
    listed: bool = True,
) -> None:
    """Stage the payloads in chunks, then make the batch visible in one script (all of it, or nothing).

    Until the script runs, no balancer can see any request; a producer that dies before it leaves only a
    staging hash that expires, and one refused (Redis full, garbage in a key) deletes its staging at once.
    ``publish_conn`` does not retry on its own; the script is idempotent per batch id, so we retry it once.
    """
    requests_key = keys.batch_requests_key(batch_id)
    try:
        _stage(conn, requests_key, specs, limits.chunk_size)
        pipe = conn.pipeline(transaction=False)
        pipe.incrby(keys.seq_key(), len(specs))
        pipe.hmget(keys.output_lengths_key(model), ["count", "tokens"])
        seq_end, lengths = pipe.execute()
        publish = functools.partial(
            _publish, publish_conn, batch_id, model=model, priority=priority, specs=specs,
            seq0=int(seq_end) - len(specs), limits=limits, metadata=metadata or {}, listed=listed,
            learned_mean=learned_mean_output(lengths),
        )  # fmt: skip
        try:
            publish()
        except CONNECTION_ERRORS:
            if conn.exists(keys.batch_key(batch_id)):
                return  # it ran; only its reply was lost
            publish()  # (the script publishes once per batch id even so)
    except (redis.ResponseError, GarbageInRedis):  # a full Redis too: nothing was published: take the staging back now
        with contextlib.suppress(redis.RedisError):
            conn.delete(requests_key)  # DEL is allowed in a full Redis, and frees what the staging took
        raise


def _stage(conn: redis.Redis, requests_key: str, specs: Sequence[RequestSpec], chunk_size: int) -> None:
    for start in range(0, len(specs), chunk_size):
        chunk = specs[start : start + chunk_size]
        pipe = conn.pipeline(transaction=False)
        pipe.hset(requests_key, mapping={str(start + i): _payload_json(s) for i, s in enumerate(chunk)})
        pipe.expire(requests_key, STAGING_TTL_S)
        pipe.execute()


def _publish(
    conn: redis.Redis,
    batch_id: str,
    *,
    model: str,
    priority: int,
    specs: Sequence[RequestSpec],
    seq0: int,
    limits: ProducerSettings,
    metadata: Mapping[str, str],
    listed: bool,
    learned_mean: float | None = None,
) -> None:
    record = _batch_record(model, priority, len(specs), limits)
    if metadata:
        record["metadata"] = json.dumps(dict(metadata))
    costs = [spec.cost_tokens(learned_mean) for spec in specs]  # expected work: output lengths as learned
    runs = ingress_runs(batch_id, costs, [spec.affinity_key() for spec in specs], priority, seq0)
    Scripts(conn).publish(batch_id=batch_id, model=model, record=record, runs=runs, tokens=sum(costs),
                          requests=len(specs), listed=listed)  # fmt: skip


def ingress_runs(
    batch_id: str, costs: Sequence[int], affinities: Sequence[str], priority: int, seq0: int
) -> list[tuple[str, int]]:
    """The batch's ingress members with their scores: runs of consecutive requests with one affinity key."""
    runs: list[tuple[str, int]] = []
    start = 0
    for end in range(1, len(costs) + 1):
        if end == len(costs) or affinities[end] != affinities[start] or end - start == keys.INGRESS_RUN_MAX:
            member = keys.ingress_member(batch_id, start, costs[start:end], affinity=affinities[start])
            runs.append((member, keys.ingress_score(priority, seq0 + start)))
            start = end
    return runs


def _payload_json(spec: RequestSpec) -> str:
    payload = spec.payload()
    return payload.model_dump_json(exclude_defaults=True)


def _batch_record(model: str, priority: int, total: int, limits: ProducerSettings) -> dict[str, str | int | float]:
    return {
        "model": model,
        "total": total,
        "priority": priority,
        "submitted_at": time.time(),
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "state": BatchState.PENDING.value,
        "ttl_s": limits.result_ttl_s,
    }


def list_batches(conn: redis.Redis, limit: int) -> list[BatchStatus]:
    """The newest ``limit`` batches, newest first; drops ids whose records have expired."""
    batch_ids: list[str] = conn.zrevrange(keys.batches_key(), 0, limit - 1)  # type: ignore[assignment]
    statuses, expired = read_batch_statuses(conn, batch_ids)
    if expired:
        conn.zrem(keys.batches_key(), *expired)
    return statuses


CANCEL_PASSES = 10  # a balancer splitting a run meanwhile leaves its rest as a new member: look again


def cancel_batch(conn: redis.Redis, scripts: Scripts, batch_id: str, model: str, chunk: int = 64) -> int:
    """Cancel what of the batch still waits in the ingress; flag it so workers cancel the rest."""
    cancelled = _cancel_pass(conn, scripts, batch_id, model, chunk)  # also flags the batch, if nothing waits
    for _ in range(CANCEL_PASSES - 1):
        members = _batch_members(conn, batch_id, model)
        if not members:
            break
        cancelled += _cancel_pass(conn, scripts, batch_id, model, chunk, members)
    return cancelled


def _batch_members(conn: redis.Redis, batch_id: str, model: str) -> list[str]:
    return [m for m, _ in conn.zscan_iter(keys.ingress_key(model), match=keys.ingress_member_pattern(batch_id))]


def _cancel_pass(
    conn: redis.Redis, scripts: Scripts, batch_id: str, model: str, chunk: int, members: list[str] | None = None
) -> int:
    now = time.time()
    submitted_at = float(conn.hget(keys.batch_key(batch_id), "submitted_at") or now)
    members = _batch_members(conn, batch_id, model) if members is None else members
    cancelled = 0
    for start in range(0, max(1, len(members)), chunk):
        runs = [_cancelled_run(batch_id, member, submitted_at, now) for member in members[start : start + chunk]]
        cancelled += scripts.cancel(batch_id=batch_id, model=model, now=now, runs=[r for r in runs if r is not None])
    return cancelled


def _cancelled_run(batch_id: str, member: str, submitted_at: float, now: float) -> CancelledRun | None:
    """The cancelled results of an ingress member's requests; None for a member that is not ours (the balancer
    drops and counts it)."""
    try:
        requests = keys.parse_ingress_member(member).requests()
    except ValueError:
        return None
    return CancelledRun(member, [_cancelled_result(batch_id, request, submitted_at, now) for request in requests])


def _cancelled_result(batch_id: str, request: keys.IngressMember, submitted_at: float, now: float) -> Result:
    return Result(
        request_id=keys.request_id(batch_id, request.start), index=request.start, text="", output_tokens=0,
        worker="", error="cancelled", cancelled=True, attempts=request.attempt, submitted_at=submitted_at,
        started_at=now, finished_at=now,
    )  # fmt: skip
