"""The RQ job hash the dispatch script writes: built once from RQ's own ``Job``, then filled in per micro-batch.

``Job.create`` and ``Job.to_dict`` cost more than the rest of a dispatch's Python; only the id, the
two timestamps, the description and the (compressed) call data change from one micro-batch to the next.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime

import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from gpulb import keys

PER_JOB = ("created_at", "data", "description", "enqueued_at")  # the fields that differ between jobs


def job_data(microbatch_id: str) -> bytes:
    """RQ's ``data`` field: the call ``JOB_FUNC(microbatch_id)``, JSON-serialized and compressed as RQ does."""
    return zlib.compress(JSONSerializer.dumps((keys.JOB_FUNC, None, [microbatch_id], {})))  # type: ignore[no-untyped-call]


def description(microbatch_id: str, worker_id: str) -> str:
    return f"gpulb micro-batch {microbatch_id} for {worker_id}"


class RqJobTemplate:
    """The job hash fields of one worker's micro-batches, exactly as RQ's ``Job.save`` writes them."""

    def __init__(self, conn: redis.Redis, worker_id: str, *, timeout_s: int, result_ttl_s: int) -> None:
        job = Job.create(
            keys.JOB_FUNC, args=["mb-template"], id="mb-template", connection=conn, serializer=JSONSerializer,
            origin=keys.rq_queue_name(worker_id), timeout=timeout_s, result_ttl=result_ttl_s,
            description=description("mb-template", worker_id), status=JobStatus.QUEUED,
        )  # fmt: skip
        job.enqueued_at = datetime.now(UTC)
        self.worker_id = worker_id
        self.fields: list[str | bytes] = []
        self.slots: dict[str, int] = {}
        for name, value in job.to_dict().items():
            if value is not None:
                self.slots[name] = len(self.fields) + 1
                self.fields += [name, value if isinstance(value, bytes | str) else str(value)]

    def fields_for(self, microbatch_id: str) -> list[str | bytes]:
        fields = self.fields.copy()
        stamp = utcformat(datetime.now(UTC))
        per_job: dict[str, str | bytes] = {"created_at": stamp, "enqueued_at": stamp, "data": job_data(microbatch_id),
                   "description": description(microbatch_id, self.worker_id)}  # fmt: skip
        for name, value in per_job.items():
            fields[self.slots[name]] = value
        return fields
