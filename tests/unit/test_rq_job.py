"""The balancer's RQ job hash template writes what RQ's own Job.create + to_dict would."""

from __future__ import annotations

import fakeredis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from gpulb import keys
from gpulb.rq_books import RqJobTemplate


def rq_fields(microbatch_id: str, worker_id: str) -> dict[str, object]:
    job = Job.create(
        keys.JOB_FUNC, args=[microbatch_id], id=microbatch_id, connection=fakeredis.FakeRedis(),
        serializer=JSONSerializer, origin=keys.rq_queue_name(worker_id), timeout=900, result_ttl=300,
        description=f"gpulb micro-batch {microbatch_id} for {worker_id}", status=JobStatus.QUEUED,
    )  # fmt: skip
    return {name: value for name, value in job.to_dict().items() if value is not None}


def test_template_fields_match_rq_except_timestamps() -> None:
    template = RqJobTemplate(fakeredis.FakeRedis(), "w1", timeout_s=900, result_ttl_s=300)
    flat = template.fields_for("mb-0123456789abcdef")
    ours = dict(zip(flat[::2], flat[1::2], strict=True))
    theirs = rq_fields("mb-0123456789abcdef", "w1")
    assert set(ours) == set(theirs) | {"enqueued_at"}
    for name in set(theirs) - {"created_at"}:
        assert str(ours[name]) == str(theirs[name]), name


def test_decoded_by_rq_as_our_call() -> None:
    template = RqJobTemplate(fakeredis.FakeRedis(), "w1", timeout_s=900, result_ttl_s=300)
    flat = template.fields_for("mb-42")
    job = Job("mb-42", connection=fakeredis.FakeRedis(), serializer=JSONSerializer)
    job.restore(dict(zip(flat[::2], flat[1::2], strict=True)))
    assert (job.func_name, job.args, job.origin, job.timeout) == (keys.JOB_FUNC, ["mb-42"], "w1", 900)
