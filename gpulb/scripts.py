"""The Lua scripts that move requests atomically, behind a typed facade: one method per script.

A crash (of any process) between two Redis calls must leave every request in exactly one place:
in its ingress, in one micro-batch record, or recorded in its batch's results. Each script (``gpulb/lua/NAME.lua``,
its KEYS/ARGV contract in its header, the shared pieces in ``gpulb/lua/lib/``) moves requests between those places in
one atomic step. :class:`Scripts` builds every script's KEYS (by gpulb.keys) and ARGV, and reads its reply into a
typed value; nothing else calls a script. A batch's keys always come as one group: batch hash, results, requests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, NamedTuple, TypeVar

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from gpulb import keys
from gpulb.errors import GarbageInRedis
from gpulb.models import Result


def _lua(name: str) -> str:
    return (resources.files("gpulb") / "lua" / name).read_text(encoding="utf-8")


def _script(name: str, *libraries: str) -> str:
    """A script's source as Redis runs it: the shared ``lib/`` pieces it uses, then ``NAME.lua``."""
    return "\n".join([*(_lua(f"lib/{library}.lua") for library in libraries), _lua(f"{name}.lua")])


# Read once, at import; each file starts with its KEYS/ARGV contract.
DISPATCH = _script("dispatch", "members", "guards")
START = _script("start", "members", "guards", "settle")
RECORD = _script("record", "members", "guards", "settle")
REQUEUE = _script("requeue", "members", "guards", "settle")
CANCEL = _script("cancel", "members", "guards", "settle")
PUBLISH = _script("publish", "members", "guards")


# -- the typed facade: one method per script; KEYS and ARGV are built here and nowhere else --------------------------

Arg = str | int | float | bytes
R = TypeVar("R")


@dataclass(slots=True)
class ScriptCall(Generic[R]):
    """One call of a script: its KEYS, its ARGV and how to read its reply. ``reran`` is set when a pipelined call met
    NOSCRIPT and ran again, loaded, outside its pipeline."""

    script: Script
    keys: list[str]
    args: list[Arg]
    parse: Callable[[Any], R]
    reran: bool = False


class DispatchReply(NamedTuple):
    """status 1 dispatched, 0 ingress empty, -1 worker not accepting, -2 no credit, -3 nothing this worker may take;
    then the requests and tokens taken, the next head's cost (-1: empty), foreign members dropped, and the next
    head's affinity key and its owner."""

    status: int
    taken: int
    tokens: int
    next_cost: int
    dropped: int
    next_affinity: str
    next_owner: str


@dataclass(frozen=True, slots=True)
class StartRequest:
    index: int
    member: str  # its ingress member as the micro-batch lists it (one request)


class StartedRequest(NamedTuple):
    done: bool  # its result was recorded already
    runs: bool  # counted as running: hand it to the backend
    payload: str | None


class StartedBatch(NamedTuple):
    submitted_at: float
    cancelled: bool
    requests: list[StartedRequest]


StartReply = list[StartedBatch] | None  # None: the micro-batch was taken back meanwhile, do not run it


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    index: int
    member: str
    result: Result
    cost: int
    started: bool  # counted as running by START


class RecordReply(NamedTuple):
    recorded: int  # results newly recorded
    garbage: int  # batches or keys left alone because they held garbage


class RequeueReply(NamedTuple):
    requeued: int
    dead_lettered: int
    was_queued: bool  # still in its RQ queue (never started)


class CancelledRun(NamedTuple):
    member: str  # an ingress member of the batch
    results: list[Result]  # the cancelled result of each of its requests, in order


def outcome_flag(result: Result) -> str:
    """How the record script counts a result: '0' completed, '1' failed, '2' cancelled."""
    if result.cancelled:
        return "2"
    return "1" if result.error else "0"


class Scripts:
    """The scripts registered on one client (EVALSHA, reloaded by redis-py after a restart), one method each.

    A method raises :class:`GarbageInRedis` when its script refused (it wrote nothing then)."""

    def __init__(self, conn: redis.Redis) -> None:
        self._dispatch = conn.register_script(DISPATCH)
        self._start = conn.register_script(START)
        self._record = conn.register_script(RECORD)
        self._requeue = conn.register_script(REQUEUE)
        self._cancel = conn.register_script(CANCEL)
        self._publish = conn.register_script(PUBLISH)

    # -- calls in a pipeline ------------------------------------------------------------------------------------------

    def queue_loads(self, pipe: redis.client.Pipeline) -> None:
        """Load the scripts sent as bare EVALSHA inside pipelines (START, RECORD), on ``pipe``."""
        for script in (self._start, self._record):
            pipe.script_load(script.script)

    def queue(self, pipe: redis.client.Pipeline, call: ScriptCall[R]) -> ScriptCall[R]:
        """Add ``call`` to ``pipe`` as EVALSHA itself (a Script object in a pipeline costs a SCRIPT EXISTS round trip
        every time); read its reply with :meth:`reply`."""
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        return call

    def reply(self, call: ScriptCall[R], raw: Any) -> R:
        """The reply of a pipelined ``call`` (``raw``: what the pipeline returned for it, errors not raised)."""
        if isinstance(raw, NoScriptError):  # Redis restarted and lost its scripts: run it again, loaded
            call.reran = True
            return self.run(call)
        if isinstance(raw, redis.ResponseError):
            raise garbage_refusal(raw) or raw
        if isinstance(raw, Exception):
            raise raw
        return call.parse(raw)

    def run(self, call: ScriptCall[R]) -> R:
        """Run ``call`` now (EVALSHA, loading the script if Redis lacks it)."""
        try:
            raw = call.script(keys=call.keys, args=call.args)
        except redis.ResponseError as exc:
            if (refusal := garbage_refusal(exc)) is None:
                raise
            raise refusal from exc
        return call.parse(raw)

    # -- one method per script ----------------------------------------------------------------------------------------

    def dispatch(
        self, *, microbatch_id: str, worker_id: str, model: str, max_requests: int, token_budget: int,
        max_outstanding: int, now: float, respect_affinity: bool, affinity_scan: int, free_owners: Sequence[str],
        owners_ttl_s: int, credit_in_slots: bool, longest_first: bool, rq_job_fields: Sequence[str | bytes],
    ) -> DispatchReply:  # fmt: skip
        """Cut one micro-batch from ``model``'s ingress and enqueue it as one RQ job on ``worker_id``'s queue."""
        script_keys = [
            keys.ingress_key(model), keys.ingress_tokens_key(model), keys.load_key(worker_id),
            keys.credit_key(worker_id), keys.inflight_key(worker_id), keys.microbatch_key(microbatch_id),
            keys.rq_job_key(microbatch_id), keys.rq_queue_key(worker_id), keys.rq_queues_key(),
            keys.affinity_key(model), keys.ingress_requests_key(model),
        ]  # fmt: skip
        args: list[Arg] = [
            microbatch_id, worker_id, model, max_requests, token_budget, max_outstanding, now,
            _flag(respect_affinity), affinity_scan, " ".join(free_owners),
            owners_ttl_s, _flag(credit_in_slots), _flag(longest_first), *rq_job_fields,
        ]  # fmt: skip
        return self.run(ScriptCall(self._dispatch, script_keys, args, _dispatch_reply))

    def start_call(
        self, *, microbatch_id: str, batches: Mapping[str, Sequence[StartRequest]]
    ) -> ScriptCall[StartReply]:
        """START: hand a micro-batch's requests (per batch id, in order) to the backend; see :meth:`start`."""
        script_keys, args = [keys.microbatch_key(microbatch_id)], list[Arg]()
        for batch_id, requests in batches.items():
            script_keys += _batch_keys(batch_id)
            args.append(len(requests))
            for request in requests:
                args += [str(request.index), request.member]
        sizes = [len(requests) for requests in batches.values()]
        return ScriptCall(self._start, script_keys, args, functools.partial(_start_reply, sizes))

    def start(self, *, microbatch_id: str, batches: Mapping[str, Sequence[StartRequest]]) -> StartReply:
        """Read the requests' payloads and count those that run as running; per batch in ``batches``' order."""
        return self.run(self.start_call(microbatch_id=microbatch_id, batches=batches))

    def record_call(
        self, *, microbatch_id: str, worker_id: str, model: str, now: float, final: bool, wake_at: int | None,
        batches: Mapping[str, Sequence[RecordedRequest]],
    ) -> ScriptCall[RecordReply]:  # fmt: skip
        """RECORD: these results of a micro-batch (per batch id); ``final`` when they are its last; ``wake_at``: wake
        the balancer only once the worker holds at most that many requests (None: always)."""
        stopped = [r.result.output_tokens for rs in batches.values() for r in rs if r.result.finish_reason == "stop"]
        script_keys = [
            keys.microbatch_key(microbatch_id), keys.inflight_key(worker_id), keys.credit_key(worker_id),
            keys.wakeup_key(), keys.output_lengths_key(model),
        ]  # fmt: skip
        args: list[Arg] = [microbatch_id, now, keys.WAKEUP_KEEP, keys.wake_worker_token(worker_id), _flag(final),
                           sum(stopped), len(stopped), "" if wake_at is None else wake_at]  # fmt: skip
        for batch_id, requests in batches.items():
            script_keys += _batch_keys(batch_id)
            args += [keys.batch_events_channel(batch_id), len(requests)]
            for r in requests:
                args += [str(r.index), r.member, r.result.model_dump_json(), outcome_flag(r.result), r.cost,
                         _flag(r.started)]  # fmt: skip
        return ScriptCall(self._record, script_keys, args, _record_reply)

    def requeue(
        self, *, microbatch_id: str, worker_id: str, model: str, batch_ids: Sequence[str], only_if_queued: bool,
        now: float, max_attempts: int, reason: str,
    ) -> RequeueReply:  # fmt: skip
        """Take a micro-batch back from ``worker_id`` and put its unfinished requests at the front of the ingress
        (``only_if_queued``: only if it never started); at ``max_attempts`` a request fails with ``reason``."""
        script_keys = [
            keys.microbatch_key(microbatch_id), keys.inflight_key(worker_id), keys.credit_key(worker_id),
            keys.rq_queue_key(worker_id), keys.rq_job_key(microbatch_id), keys.ingress_key(model),
            keys.ingress_tokens_key(model), keys.wakeup_key(), keys.ingress_requests_key(model),
        ]  # fmt: skip
        dead_letter = Result(request_id="", index=0, text="", output_tokens=0, worker=worker_id, error=reason,
                             submitted_at=now, started_at=now, finished_at=now)  # fmt: skip
        args: list[Arg] = [
            microbatch_id, _flag(only_if_queued), now, max_attempts, keys.WAKEUP_KEEP,
            keys.wake_worker_token(worker_id), dead_letter.model_dump_json(),
        ]  # fmt: skip
        for batch_id in batch_ids:
            script_keys += _batch_keys(batch_id)
            args += [batch_id, keys.batch_events_channel(batch_id)]
        return self.run(ScriptCall(self._requeue, script_keys, args, _requeue_reply))

    def cancel(self, *, batch_id: str, model: str, now: float, runs: Sequence[CancelledRun]) -> int:
        """Remove these ``runs`` of a batch from the ingress and record their results; the requests cancelled here."""
        script_keys = [
            keys.ingress_key(model), keys.ingress_tokens_key(model), *_batch_keys(batch_id),
            keys.ingress_requests_key(model),
        ]  # fmt: skip
        args: list[Arg] = [now, keys.batch_events_channel(batch_id)]
        for run in runs:
            args += [run.member, *(result.model_dump_json() for result in run.results)]
        return self.run(ScriptCall(self._cancel, script_keys, args, int))

    def publish(
        self, *, batch_id: str, model: str, record: Mapping[str, str | int | float], runs: Sequence[tuple[str, int]],
        tokens: int, requests: int, listed: bool,
    ) -> bool:  # fmt: skip
        """Make a staged batch visible: its ``record``, its ingress ``runs`` (member, score) and counters; False when
        it was already (a retry whose first reply was lost)."""
        script_keys = [
            keys.batch_requests_key(batch_id), keys.batch_key(batch_id), keys.batches_key(), keys.ingress_key(model),
            keys.ingress_tokens_key(model), keys.ingress_requests_key(model), keys.models_key(), keys.wakeup_key(),
        ]  # fmt: skip
        args: list[Arg] = [
            _flag(listed), keys.BATCH_INDEX_KEEP, batch_id, record["submitted_at"], tokens, requests, model,
            keys.wake_batch_token(batch_id), keys.WAKEUP_KEEP, len(record),
        ]  # fmt: skip
        for field, value in record.items():
            args += [field, value]
        for member, score in runs:
            args += [score, member]
        return self.run(ScriptCall(self._publish, script_keys, args, _published))


def _batch_keys(batch_id: str) -> list[str]:
    """A batch's keys as every script takes them."""
    return [keys.batch_key(batch_id), keys.batch_results_key(batch_id), keys.batch_requests_key(batch_id)]


def _flag(on: bool) -> str:
    return "1" if on else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dispatch_reply(raw: Any) -> DispatchReply:
    status, taken, tokens, next_cost, dropped = (int(x) for x in raw[:5])
    return DispatchReply(status, taken, tokens, next_cost, dropped, _text(raw[5]), _text(raw[6]))


def _start_reply(sizes: list[int], raw: Any) -> StartReply:
    """Per batch (of ``sizes`` requests): submitted_at, cancelled ('1' or ''), then per request: done, runs ('1' or
    ''), payload."""
    if raw is None:
        return None
    values = iter([None if v is None else _text(v) for v in raw])
    batches = []
    for size in sizes:
        submitted_at, cancelled = float(next(values) or 0.0), bool(next(values))
        requests = [StartedRequest(bool(next(values)), bool(next(values)), next(values)) for _ in range(size)]
        batches.append(StartedBatch(submitted_at, cancelled, requests))
    return batches


def _record_reply(raw: Any) -> RecordReply:
    return RecordReply(int(raw[0]), int(raw[1]))


def _requeue_reply(raw: Any) -> RequeueReply:
    requeued, dead_lettered, queued = (int(x) for x in raw)
    return RequeueReply(requeued, dead_lettered, queued > 0)


def _published(raw: Any) -> bool:
    return int(raw) == 1


def garbage_refusal(exc: redis.ResponseError) -> GarbageInRedis | None:
    """The refusal of a script that found garbage (``'GARBAGE <key> <what>'``, nothing written), else None."""
    text = str(exc)
    if not text.startswith("GARBAGE "):
        return None
    key, _, what = text.removeprefix("GARBAGE ").partition(" ")
    return GarbageInRedis(key, what.split(" script:")[0])
