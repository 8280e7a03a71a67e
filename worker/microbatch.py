"""Reading a micro-batch's requests from Redis and building the arguments that record its results."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

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
    """KEYS and ARGV of :data:`gpulb.scripts.START` for one micro-batch, and the items it fills in."""

    keys: list[str]
    args: list[str | int]
    items: list[Item]
    groups: list[list[int]]  # per batch, in KEYS order: positions in ``items``


def start_call(microbatch_id: str, members: list[str]) -> StartCall:
    items = parse_members(members)
    groups: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        groups[item.batch_id].append(position)
    script_keys, args = [keys.microbatch_key(microbatch_id)], list[str | int]()
    for batch_id, positions in groups.items():
        script_keys += [keys.batch_key(batch_id), keys.batch_requests_key(batch_id), keys.batch_results_key(batch_id)]
        args.append(len(positions))
        for p in positions:
            args += [str(items[p].index), members[p]]
    return StartCall(script_keys, args, items, list(groups.values()))


def apply_start(call: StartCall, reply: list[str | None] | None) -> list[Item] | None:
    """Fill the items from the START script's reply; None if the micro-batch was taken back."""
    if reply is None:
        return None
    values = iter(reply)
    for positions in call.groups:
        submitted_at, cancelled = float(next(values) or 0.0), bool(next(values))
        for p in positions:
            item = call.items[p]
            item.submitted_at, item.cancelled = submitted_at, cancelled
            item.already_done, item.started = bool(next(values)), bool(next(values))
            _attach_payload(item, next(values))
    return call.items


def start_microbatch(scripts: Scripts, microbatch_id: str, members: list[str]) -> list[Item] | None:
    """Read the requests and count those that run as running, in one call; None if taken back."""
    call = start_call(microbatch_id, members)
    return apply_start(call, scripts.start(keys=call.keys, args=call.args))


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


def outcome_flag(result: Result) -> str:
    """How the record script counts a result: '0' completed, '1' failed, '2' cancelled."""
    if result.cancelled:
        return "2"
    return "1" if result.error else "0"


@dataclass(slots=True)
class Settled:
    """A request of a micro-batch with its result, ready to be recorded."""

    item: Item
    result: Result


def record_arguments(
    microbatch_id: str, worker_id: str, model: str, now: float, settled: list[Settled], *, final: bool,
    wake_at: int | None = None,
) -> tuple[list[str], list[str | int | float]]:  # fmt: skip
    """KEYS and ARGV for :data:`gpulb.scripts.RECORD`: these requests' results; ``final`` when they are the last;
    ``wake_at``: wake the balancer only once the worker holds at most that many requests."""
    stopped = [s.result.output_tokens for s in settled if s.result.finish_reason == "stop"]
    script_keys = [
        keys.microbatch_key(microbatch_id), keys.inflight_key(worker_id), keys.credit_key(worker_id),
        keys.wakeup_key(), keys.output_lengths_key(model),
    ]  # fmt: skip
    args: list[str | int | float] = [microbatch_id, now, keys.WAKEUP_KEEP, worker_id, "1" if final else "",
                                     sum(stopped), len(stopped), "" if wake_at is None else wake_at]  # fmt: skip
    groups: dict[str, list[Settled]] = defaultdict(list)
    for one in settled:
        groups[one.item.batch_id].append(one)
    for batch_id, members in groups.items():
        script_keys += [keys.batch_key(batch_id), keys.batch_results_key(batch_id), keys.batch_requests_key(batch_id)]
        args += [keys.batch_events_channel(batch_id), len(members)]
        for one in members:
            item = one.item
            args += [str(item.index), item.member(), one.result.model_dump_json(), outcome_flag(one.result), item.cost,
                     "1" if item.started else ""]  # fmt: skip
    return script_keys, args
