"""Reading a micro-batch's requests from Redis (START) and recording their results (RECORD)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pydantic import ValidationError

from gpulb import keys
from gpulb.models import RequestPayload, Result
from gpulb.scripts import RecordedRequest, RecordReply, ScriptCall, Scripts, StartReply, StartRequest


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
    started: bool = False  # counted as running by the START script (a malformed payload too)
    affinity: str = ""

    @property
    def runnable(self) -> bool:
        return self.started and self.problem is None and self.payload is not None

    def member(self) -> str:
        """Its ingress member as the micro-batch lists it (one request)."""
        return keys.ingress_member(self.batch_id, self.index, (self.cost,), self.attempt, self.affinity)


def parse_members(members: list[str]) -> list[Item]:
    return [_item(keys.parse_ingress_member(m)) for m in members]


@dataclass(slots=True)
class StartCall:
    """A micro-batch's START (:meth:`gpulb.scripts.Scripts.start_call`) and the items its reply fills in."""

    call: ScriptCall[StartReply]
    items: list[Item]
    groups: list[list[int]]  # per batch, in the call's order: positions in ``items``


def start_call(scripts: Scripts, microbatch_id: str, members: list[str]) -> StartCall:
    items = parse_members(members)
    groups: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        groups[item.batch_id].append(position)
    batches = {batch_id: [StartRequest(items[p].index, members[p]) for p in ps] for batch_id, ps in groups.items()}
    return StartCall(scripts.start_call(microbatch_id=microbatch_id, batches=batches), items, list(groups.values()))


def apply_start(call: StartCall, reply: StartReply) -> list[Item] | None:
    """Fill the items from the START script's reply; None if the micro-batch was taken back."""
    if reply is None:
        return None
    for positions, batch in zip(call.groups, reply, strict=True):
        for p, started in zip(positions, batch.requests, strict=True):
            item = call.items[p]
            item.submitted_at, item.cancelled = batch.submitted_at, batch.cancelled
            item.already_done, item.started = started.done, started.runs
            _attach_payload(item, started.payload)
    return call.items


def start_microbatch(scripts: Scripts, microbatch_id: str, members: list[str]) -> list[Item] | None:
    """Read the requests and count those that run as running, in one call; None if taken back."""
    call = start_call(scripts, microbatch_id, members)
    return apply_start(call, scripts.run(call.call))


def _item(request: keys.IngressMember) -> Item:
    return Item(request.batch_id, request.start, request.costs[0], request.attempt, affinity=request.affinity)


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


@dataclass(slots=True)
class Settled:
    """A request of a micro-batch with its result, ready to be recorded."""

    item: Item
    result: Result


def record_call(
    scripts: Scripts, microbatch_id: str, worker_id: str, model: str, now: float, settled: list[Settled], *,
    final: bool, wake_at: int | None = None,
) -> ScriptCall[RecordReply]:  # fmt: skip
    """RECORD of these requests' results; ``final`` when they are the last; ``wake_at``: wake the balancer only once
    the worker holds at most that many requests."""
    batches: dict[str, list[RecordedRequest]] = defaultdict(list)
    for one in settled:
        item = one.item
        batches[item.batch_id].append(RecordedRequest(item.index, item.member(), one.result, item.cost, item.started))
    return scripts.record_call(microbatch_id=microbatch_id, worker_id=worker_id, model=model, now=now, final=final,
                               wake_at=wake_at, batches=batches)  # fmt: skip
