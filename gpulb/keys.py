"""Every Redis key gpulb uses, built here and nowhere else.

Schema version 2 (version 1 had one ingress member per request). ``{model}`` is a Redis Cluster hash tag so one
model's ingress keys share a slot. The records that more than one role reads (a worker's load, a batch's record,
its results) are read through gpulb.records; the Lua scripts that write them are called through gpulb.scripts.

| key                                  | type   | TTL                  | written by                 | read by            |
|--------------------------------------|--------|----------------------|----------------------------|--------------------|
| gpulb:seq                            | string | none                 | producer (INCRBY)          | producer           |
| gpulb:models                         | set    | none                 | producer, worker           | status             |
| gpulb:{M}:ingress                    | zset   | none                 | producer (ZADD), balancer  | balancer           |
|   member ``BATCH:START:ATTEMPT:AFFINITY:COST,COST,...`` (a run of up to 128 consecutive requests),       |
|   score ``-priority * 2**44 + seq`` of its first request (lowest pops first)                                |
| gpulb:{M}:ingress_tokens             | string | none                 | producer (+), balancer (-) | balancer, status   |
| gpulb:{M}:ingress_requests           | string | none                 | producer (+), balancer (-) | status, metrics    |
| gpulb:{M}:lengths                    | hash   | none                 | worker (record script)     | producer           |
|   fields count, tokens: requests that stopped by themselves and their output tokens (halved past 20,000)      |
| gpulb:{M}:affinity                   | hash   | 1 h after last write | balancer (dispatch script) | balancer           |
|   field affinity key -> worker id that served it last (prefix-affinity policy)                                 |
| gpulb:batch:B                        | hash   | result TTL once done | producer, worker           | producer           |
|   fields model, total, priority, submitted_at, running, completed, failed, cancelled, state, finished_at, |
|   ttl_s, cancelled_at, metadata (JSON object of strings)                                                     |
| gpulb:batches                        | zset   | none (pruned)        | producer (ZADD)            | status, batch list |
|   member batch id, score submitted_at; the newest 10,000; readers drop ids whose batch hash has expired       |
| gpulb:batch:B:requests               | hash   | result TTL once done | producer (HSET), worker    | worker             |
|   field INDEX -> request JSON; a field is deleted once its result is recorded                               |
| gpulb:batch:B:results                | hash   | result TTL once done | worker (HSETNX)            | producer           |
| gpulb:batch:B:events                 | pubsub | -                    | worker (PUBLISH)           | producer (wait)    |
| gpulb:batch:B:text:I                 | stream | 5 min after last XADD | worker (XADD)             | producer (XREAD)   |
|   a streamed request's text as the engine makes it: entries ``r`` (the run: worker, attempt, try), ``t``      |
| gpulb:batch:B:abort                  | string | 5 min                | producer (SET)             | worker             |
|   its reader went away (a streaming client disconnected): running requests are aborted in the engine         |
| gpulb:workers                        | set    | none                 | worker                     | balancer, status   |
| gpulb:worker:W:load                  | hash   | load TTL (heartbeat) | worker                     | balancer, status   |
|   fields v, model, backend, state, capacity, slots, queue_slots, running, queued, tokens_per_s, host,      |
|   pid, gpu, engine and GPU figures, ts                                                                        |
|   the gateway and ``gpulb submit`` read model and state of each, to list the models served                   |
| gpulb:worker:W:claim                 | string | 30 s (deleted)       | worker (SET NX)            | worker             |
|   ``HOST:PID`` of the worker registering as W; of two racing for one id only one sets it                    |
| gpulb:worker:W:credit                | hash   | none                 | balancer (+), worker (-)   | balancer           |
|   fields batches, tokens, requests: handed to W and not yet recorded (requests leave one by one)           |
| gpulb:worker:W:inflight              | set    | none                 | balancer (+), worker (-)   | recovery           |
| gpulb:mb:ID                          | hash   | none                 | balancer, worker           | worker             |
|   fields worker, model, tokens and count (still held), entries (one ingress member per request), scores     |
|   (runs ``SCORExCOUNT``: COUNT consecutive scores from SCORE), created_at, ran (members handed to the        |
|   backend), ``=MEMBER`` (that request is recorded and its credit given back)                                 |
| gpulb:balancer:wakeup                | list   | none (trimmed)       | producer, worker           | balancer (BLPOP)   |
|   tokens ``w:WORKER`` (its load or credit changed) and ``b:BATCH`` (submitted)                                 |
| gpulb:stats                          | hash   | none                 | balancer, worker (HINCRBY) | status             |
|   bad data seen and skipped: malformed_load_keys, dropped_ingress_members, refused_jobs, malformed_payloads     |
| gpulb:durable                        | string | none                 | producer, worker (INCR)    | -                  |
|   a write whose fsync (WAITAOF) confirms every earlier write: durable_acks only                                |
| gpulb:balancer:heartbeat             | hash   | 10 s, refreshed      | balancer                   | status             |
|   fields host, pid, ts, requests, micro_batches                                                                |
| gpulb:gw:file:F                      | hash   | none (DELETE)        | gateway                    | gateway            |
|   fields id, bytes, created_at, filename, purpose, content (an uploaded or produced JSONL file), expires_at  |
| gpulb:gw:files                       | zset   | none                 | gateway                    | gateway            |
| gpulb:gw:batch:ID                    | hash   | none                 | gateway                    | gateway            |
|   field record: the OpenAI batch object's state as JSON (with gpulb_batch, the gpulb batch id)               |
| gpulb:gw:batch:ID:finalizing         | string | 300 s                | gateway (SET NX)           | gateway            |
| gpulb:gw:batches, gpulb:gw:active    | zset   | none                 | gateway                    | gateway            |
|   every gateway batch by created_at; those not final yet                                                     |
| gpulb:gw:tenant:T:files, :batches    | zset   | none                 | gateway                    | gateway            |
|   one tenant's files and batches (T: a hash of its API key, never the key); file hashes and batch records   |
|   carry ``tenant`` too                                                                                       |
| rq:queue:W, rq:job:ID, rq:queues     | RQ's   | RQ's                 | balancer (dispatch script) | worker (RQ)        |
| rq:worker:W and RQ's registries      | RQ's   | RQ's                 | worker (RQ), recovery      | rq info, recovery  |
|   named by RQ; gpulb.rq_books checks at start-up that the installed RQ names them as here                     |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

SCHEMA_VERSION = 2
PREFIX = "gpulb"

# The one function gpulb workers will run; the balancer names it as a string, never imports it.
JOB_FUNC = "worker.jobs.run_microbatch"

PRIORITY_SPAN = 2**44  # seq values stay below this; priorities within +-255 keep scores exact floats
MAX_ABS_PRIORITY = 255
WAKEUP_KEEP = 64  # the wake-up list never holds more than this many tokens


def seq_key() -> str:
    return f"{PREFIX}:seq"


def gateway_file_key(file_id: str) -> str:
    return f"{PREFIX}:gw:file:{file_id}"


def gateway_files_key() -> str:
    return f"{PREFIX}:gw:files"


def gateway_batch_key(batch_id: str) -> str:
    return f"{PREFIX}:gw:batch:{batch_id}"


def gateway_finalize_lock_key(batch_id: str) -> str:
    return f"{PREFIX}:gw:batch:{batch_id}:finalizing"


def gateway_batches_key() -> str:
    return f"{PREFIX}:gw:batches"


def gateway_active_key() -> str:
    return f"{PREFIX}:gw:active"


def gateway_tenant_files_key(tenant: str) -> str:
    return f"{PREFIX}:gw:tenant:{tenant}:files"


def gateway_tenant_batches_key(tenant: str) -> str:
    return f"{PREFIX}:gw:tenant:{tenant}:batches"


BATCH_INDEX_KEEP = 10_000  # batches listed by `gpulb batch list`; older ids drop out of the index


def batches_key() -> str:
    return f"{PREFIX}:batches"


def models_key() -> str:
    return f"{PREFIX}:models"


def ingress_key(model: str) -> str:
    return f"{PREFIX}:{{{model}}}:ingress"


def ingress_tokens_key(model: str) -> str:
    return f"{PREFIX}:{{{model}}}:ingress_tokens"


def ingress_requests_key(model: str) -> str:
    return f"{PREFIX}:{{{model}}}:ingress_requests"


def output_lengths_key(model: str) -> str:
    return f"{PREFIX}:{{{model}}}:lengths"


def affinity_key(model: str) -> str:
    return f"{PREFIX}:{{{model}}}:affinity"


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def batch_requests_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:requests"


def batch_results_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:results"


def text_stream_key(batch_id: str, index: int) -> str:
    return f"{PREFIX}:batch:{batch_id}:text:{index}"


def abort_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:abort"


STREAM_TTL_S = 300  # a streamed request's text and its batch's abort flag outlive any reader that still waits
STREAM_MAXLEN = 100_000  # pieces kept per streamed request (XADD MAXLEN ~): more than any answer has


def batch_events_channel(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:events"


def workers_key() -> str:
    return f"{PREFIX}:workers"


def load_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:load"


def worker_claim_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:claim"


def credit_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:credit"


def inflight_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:inflight"


def microbatch_key(microbatch_id: str) -> str:
    return f"{PREFIX}:mb:{microbatch_id}"


def wakeup_key() -> str:
    return f"{PREFIX}:balancer:wakeup"


WAKE_WORKER = "w:"  # wake-up token naming a worker whose load or credit changed
WAKE_BATCH = "b:"  # wake-up token naming a batch that was just submitted


def wake_worker_token(worker_id: str) -> str:
    return f"{WAKE_WORKER}{worker_id}"


def wake_batch_token(batch_id: str) -> str:
    return f"{WAKE_BATCH}{batch_id}"


def durable_mark_key() -> str:
    return f"{PREFIX}:durable"


def stats_key() -> str:
    return f"{PREFIX}:stats"


def balancer_heartbeat_key() -> str:
    return f"{PREFIX}:balancer:heartbeat"


# RQ's own keys, named as RQ names them; gpulb.rq_books checks these names against the installed RQ at start-up.
RQ_QUEUE_PREFIX = "rq:queue:"
RQ_JOB_PREFIX = "rq:job:"
RQ_WORKER_PREFIX = "rq:worker:"


def rq_queue_name(worker_id: str) -> str:
    """A worker listens on exactly one RQ queue, named after the worker (``rq info`` shows it)."""
    return worker_id


def rq_queue_key(worker_id: str) -> str:
    return f"{RQ_QUEUE_PREFIX}{rq_queue_name(worker_id)}"


def rq_intermediate_key(worker_id: str) -> str:
    return f"{rq_queue_key(worker_id)}:intermediate"


def rq_queues_key() -> str:
    return "rq:queues"


def rq_job_key(job_id: str) -> str:
    return f"{RQ_JOB_PREFIX}{job_id}"


def rq_worker_key(worker_id: str) -> str:
    return f"{RQ_WORKER_PREFIX}{worker_id}"


# Ingress members pack what the balancer needs to cut a micro-batch without another read. One
# member holds a run of consecutive requests of one batch that share attempt and affinity key, so
# that a pending request costs a few bytes of a member instead of a sorted-set entry of its own.

INGRESS_RUN_MAX = 128  # requests per ingress member at most (the member carries one cost per request)


class IngressMember(NamedTuple):
    batch_id: str
    start: int  # index of its first request in the batch; the others follow in order
    attempt: int  # runs started so far
    affinity: str  # prefix/session affinity key, "" if none
    costs: tuple[int, ...]  # tokens of work of each request (see gpulb.models.request_cost)

    def requests(self) -> list[IngressMember]:
        """One member per request (a micro-batch lists its requests so)."""
        return [self._replace(start=self.start + i, costs=(cost,)) for i, cost in enumerate(self.costs)]

    def __str__(self) -> str:
        return ingress_member(self.batch_id, self.start, self.costs, self.attempt, self.affinity)


def request_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


def ingress_member(batch_id: str, start: int, costs: Sequence[int], attempt: int = 0, affinity: str = "") -> str:
    """``BATCH:START:ATTEMPT:AFFINITY:COST,COST,...``: requests START, START+1, ... of BATCH."""
    return f"{batch_id}:{start}:{attempt}:{affinity}:{','.join(map(str, costs))}"


# As the scripts' split_member reads them: ASCII only, bounded lengths (Lua would write a longer number as a float).
_INGRESS_MEMBER = re.compile(r"([A-Za-z0-9]+):([0-9]{1,12}):([0-9]{1,6}):([A-Za-z0-9]*):([0-9]{1,10}(?:,[0-9]{1,10})*)")


def parse_ingress_member(member: str) -> IngressMember:
    """Raises ValueError on a foreign member."""
    match = _INGRESS_MEMBER.fullmatch(member)
    if match is None:
        raise ValueError(f"not a gpulb ingress member: {member!r}")
    batch_id, start, attempt, affinity, costs = match.groups()
    return IngressMember(batch_id, int(start), int(attempt), affinity, tuple(int(c) for c in costs.split(",")))


def ingress_member_pattern(batch_id: str) -> str:
    """A ZSCAN MATCH pattern for one batch's members of an ingress."""
    return f"{batch_id}:*"


def ingress_score(priority: int, seq: int) -> int:
    return -priority * PRIORITY_SPAN + seq
