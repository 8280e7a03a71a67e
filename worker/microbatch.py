"""Reading a micro-batch's requests from Redis and building the arguments that record its results."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from gpulb import keys
from gpulb.models import RequestPayload, Result
from gpulb.scripts import Scripts


@dataclass(slots=True)
class Item:
    """One request of a micro-batch, as the worker sees it."""

    batch_id: str
    index: int
    cost: int
    attempt: int
    submitted_at: float = 0.0
    payload: RequestPayload | None = None
    already_done: bool = False
    cancelled: bool = False
    problem: str | None = None  # why it cannot run (missing or malformed payload)

    @property
    def runnable(self) -> bool:
        return not self.already_done and not self.cancelled and self.problem is None and self.payload is not None


def load_items(conn: redis.Redis, members: list[str]) -> list[Item]:
    """The micro-batch's requests with payloads, skipping none: one pipelined round trip."""
    items = [_item(keys.parse_ingress_member(m)) for m in members]
    by_batch: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_batch[item.batch_id].append(item)
    pipe = conn.pipeline(transaction=False)
    for batch_id, group in by_batch.items():
        fields = [str(i.index) for i in group]
        pipe.hmget(keys.batch_requests_key(batch_id), fields)
        pipe.hmget(keys.batch_results_key(batch_id), fields)
        pipe.hmget(keys.batch_key(batch_id), ["submitted_at", "cancelled_at"])
    replies = iter(pipe.execute())
    for group in by_batch.values():
        payloads, results, (submitted_at, cancelled_at) = next(replies), next(replies), next(replies)
        for item, payload, result in zip(group, payloads, results, strict=True):
            item.submitted_at = float(submitted_at or 0.0)
            item.already_done = result is not None
            item.cancelled = cancelled_at is not None
            _attach_payload(item, payload)
    return items


def _item(request: keys.IngressMember) -> Item:
    return Item(request.batch_id, request.start, request.costs[0], request.attempt)


def _attach_payload(item: Item, raw: str | None) -> None:
    if item.already_done:
        return
    if raw is None:
        item.problem = "request payload missing from Redis"
        return
    try:
        item.payload = RequestPayload.model_validate_json(raw)
    except ValidationError as exc:
        item.problem = f"malformed request payload: {exc.errors()[0]['msg']}"


def outcome_flag(result: Result) -> str:
    """How the record script counts a result: '0' completed, '1' failed, '2' cancelled."""
    if result.cancelled:
        return "2"
    return "1" if result.error else "0"


def mark_started(scripts: Scripts, microbatch_id: str, items: list[Item], members: list[str]) -> bool:
    """Count the runnable requests as running (once); False if the micro-batch was taken back."""
    started: dict[str, int] = defaultdict(int)
    for item in items:
        if item.runnable:
            started[item.batch_id] += 1
    ran = " ".join(m for m, i in zip(members, items, strict=True) if i.runnable)
    script_keys = [keys.microbatch_key(microbatch_id)] + [keys.batch_key(b) for b in started]
    return bool(scripts.mark_started(keys=script_keys, args=[ran, *started.values()]))


def record_arguments(
    microbatch_id: str, worker_id: str, now: float, items: list[Item], results: dict[int, Result]
) -> tuple[list[str], list[str | int | float]]:
    """KEYS and ARGV for :data:`gpulb.scripts.RECORD`; ``results`` is keyed by position in ``items``."""
    script_keys = [
        keys.microbatch_key(microbatch_id),
        keys.inflight_key(worker_id),
        keys.credit_key(worker_id),
        keys.wakeup_key(),
    ]
    args: list[str | int | float] = [microbatch_id, now, keys.WAKEUP_KEEP, worker_id]
    groups: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        groups[item.batch_id].append(position)
    for batch_id, positions in groups.items():
        script_keys += [keys.batch_key(batch_id), keys.batch_results_key(batch_id), keys.batch_requests_key(batch_id)]
        recorded = [p for p in positions if p in results]
        started = sum(1 for p in positions if items[p].runnable)
        args += [keys.batch_events_channel(batch_id), started, len(recorded)]
        for p in recorded:
            result = results[p]
            args += [str(items[p].index), result.model_dump_json(), outcome_flag(result)]
    return script_keys, args
