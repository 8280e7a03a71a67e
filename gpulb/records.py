"""One reader for each record in Redis that more than one part reads, beside the record's model.

- a worker's load (``gpulb:worker:W:load``, :class:`WorkerLoad`): the balancer's fleet, ``gpulb status``, and the
  served models that the gateway, ``gpulb submit`` and ``gpulb demo`` check;
- a batch's record (``gpulb:batch:B``, :class:`BatchStatus`): the producer's client, ``gpulb status``;
- a request's result (in ``gpulb:batch:B:results``, :class:`Result`): the producer's handles and text streams,
  and so the gateway and ``gpulb batch``.

Readers that share a pipeline with other reads come as a pair: ``queue_*`` puts the commands on the
pipeline, ``*_from_reply`` turns a reply into the model. Garbage in Redis is a :class:`BadPayload`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis

from gpulb import keys
from gpulb.errors import BadPayload, BatchNotFound
from gpulb.models import BatchStatus, Result, WorkerLoad, WorkerState


def queue_load_reads(pipe: redis.client.Pipeline, worker_ids: Sequence[str]) -> None:
    """Queue one ``HGETALL`` of each worker's load key on ``pipe``: one reply each, for :func:`load_from_reply`."""
    for worker_id in worker_ids:
        pipe.hgetall(keys.load_key(worker_id))


def load_from_reply(reply: Mapping[str, str] | redis.ResponseError) -> WorkerLoad | None:
    """A worker's load from its ``HGETALL`` reply; None when it has no load key (its heartbeat expired).

    :class:`BadPayload` when the key holds garbage, or is not a hash (the error a pipeline executed with
    ``raise_on_error=False`` hands back); any other error in the reply is raised as it is."""
    if isinstance(reply, redis.ResponseError):
        if "WRONGTYPE" not in str(reply):
            raise reply
        raise BadPayload("malformed load key: not a hash")
    return WorkerLoad.from_hash(reply) if reply else None


def read_served_models(conn: redis.Redis) -> list[str]:
    """The models of the workers with a load key (it expires when a worker goes silent) that are not draining:
    one that is starting counts, as its model is about to be served. Reads only those two fields of each load."""
    worker_ids: list[str] = sorted(conn.smembers(keys.workers_key()))  # type: ignore[arg-type]
    pipe = conn.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.hmget(keys.load_key(worker_id), ["model", "state"])
    return sorted({model for model, state in pipe.execute() if model and state != WorkerState.DRAINING})


def read_batch_status(conn: redis.Redis, batch_id: str) -> BatchStatus:
    """The batch's record; :class:`BatchNotFound` once it has expired (or was never written)."""
    raw: dict[str, str] = conn.hgetall(keys.batch_key(batch_id))  # type: ignore[assignment]
    if not raw:
        raise BatchNotFound(f"batch {batch_id} not found (never submitted, or its results expired)")
    return BatchStatus.from_hash(batch_id, raw)


def read_batch_statuses(conn: redis.Redis, batch_ids: Sequence[str]) -> tuple[list[BatchStatus], list[str]]:
    """These batches' records in one round trip, in order, malformed ones left out; and the ids whose record
    has expired."""
    pipe = conn.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hgetall(keys.batch_key(batch_id))
    statuses, expired = [], []
    for batch_id, raw in zip(batch_ids, pipe.execute(), strict=True):
        if not raw:
            expired.append(batch_id)
            continue
        try:
            statuses.append(BatchStatus.from_hash(batch_id, raw))
        except BadPayload:
            continue
    return statuses, expired


def read_results(conn: redis.Redis, batch_id: str, total: int) -> list[Result]:
    """Every result of a finished batch, in submission order; :class:`BatchNotFound` if some have expired."""
    raw: dict[str, str] = conn.hgetall(keys.batch_results_key(batch_id))  # type: ignore[assignment]
    missing = total - len(raw)
    if missing:
        raise BatchNotFound(f"batch {batch_id}: {missing} of {total} results are missing (expired?)")
    return [Result.model_validate_json(raw[str(index)]) for index in range(total)]


def read_result(conn: redis.Redis, batch_id: str, index: int) -> Result | None:
    """One request's result; None until it is recorded."""
    raw = conn.hget(keys.batch_results_key(batch_id), str(index))
    return None if raw is None else Result.model_validate_json(raw)
