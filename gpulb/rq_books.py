"""What gpulb writes in RQ's books: the one module of gpulb's core that imports ``rq``.

gpulb runs its micro-batches as RQ jobs so that RQ's tools (``rq info``, rq-dashboard) see them. The balancer's
dispatch script writes each job hash from a template built here by RQ's own ``Job``; workers keep RQ's registries,
results and worker records as RQ's own worker would (:func:`finish_job`); recovery fails the jobs of dead workers
(:func:`fail_started_job`) and retires their worker records (:func:`retire_worker`). All of it uses RQ's public API.

The worker's RQ glue (``worker/rq_worker.py``) overrides RQ methods, so it depends on their signatures: a worker
and a balancer call :func:`check_rq` as they start, which fails with :class:`gpulb.errors.RqIncompatible`, naming
the installed version and what it lacks, if the RQ installed is not one gpulb can run on; a new RQ release breaks
gpulb loudly at start-up, not at its first job. The key names gpulb builds for RQ (``gpulb.keys.rq_*``) are
checked against the installed RQ's there too.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import redis
import rq
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import utcformat
from rq.worker import Worker

from gpulb import keys
from gpulb.errors import RqIncompatible
from gpulb.logs import get_logger

log = get_logger("gpulb.rq")

TESTED_RQ = ((2, 12), (2, 13))  # gpulb is tested with rq >= 2.12, < 2.13 (pyproject.toml pins the same range)
SERIALIZER = JSONSerializer  # gpulb's RQ jobs are JSON, never pickle


# -- the start-up check -----------------------------------------------------------------------------


class Relied(NamedTuple):
    """One RQ method or attribute gpulb relies on: ``params``, the names of its parameters (``self`` aside), one
    space apart; None for an attribute.

    An ``overridden`` method must take exactly ``params`` (RQ calls gpulb's override with its own arguments);
    a called one must take them, and may take more only with defaults.
    """

    owner: Any  # a class or a module of rq
    name: str
    params: str | None = None
    overridden: bool = False


_RESULT_CREATE = (
    "job type ttl return_value exc_string worker_name pipeline execution_id execution_started_at execution_ended_at"
)
BOOKS_CONTRACT = (
    Relied(Job, "create", "func args connection result_ttl status description timeout id origin serializer"),
    Relied(Job, "to_dict", ""),
    Relied(Job, "fetch", "id connection serializer"),
    Relied(Job, "get_status", "refresh"),
    Relied(Job, "set_status", "status pipeline"),
    Relied(Job, "save", "pipeline include_meta include_result"),
    Relied(Job, "finished_job_registry"),
    Relied(FailedJobRegistry, "add", "job ttl exc_string pipeline"),
    Relied(FinishedJobRegistry, "add", "job ttl pipeline"),
    Relied(FinishedJobRegistry, "remove", "job"),
    Relied(StartedJobRegistry, "remove_executions", "job"),
    Relied(Result, "create", _RESULT_CREATE),
    Relied(Result, "create_failure", "job ttl exc_string worker_name pipeline"),
    Relied(Worker, "find_by_key", "worker_key connection serializer"),
    Relied(Worker, "register_death", ""),
    Relied(Worker, "redis_worker_namespace_prefix"),
)


def check_rq(contract: Iterable[Relied] = (), *, version: str = rq.__version__) -> None:
    """Fail at start-up if the installed RQ lacks what gpulb writes with (and what ``contract`` lists).

    An RQ outside the tested range that has all of it only earns a warning.
    """
    problems = [p for relied in (*BOOKS_CONTRACT, *contract) if (p := _problem(relied)) is not None]
    problems += _key_name_problems()
    tested = "rq >={}.{},<{}.{}".format(*TESTED_RQ[0], *TESTED_RQ[1])
    if problems:
        raise RqIncompatible(
            f"gpulb runs on {tested}; the installed rq {version} does not have what gpulb relies on: "
            + "; ".join(problems)
        )
    if not TESTED_RQ[0] <= _release(version) < TESTED_RQ[1]:
        log.warning("untested rq version: gpulb is tested with another", rq_version=version, tested=tested)


def _release(version: str) -> tuple[int, int]:
    """``(2, 12)`` of ``2.12.0`` or ``2.12.0rc1``; ``(0, 0)`` of a version that does not start so."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _problem(relied: Relied) -> str | None:
    """What is wrong with one relied-on name in the installed RQ, or None."""
    where = f"{getattr(relied.owner, '__name__', relied.owner)}.{relied.name}"
    if not hasattr(relied.owner, relied.name):
        return f"{where} is missing"
    if relied.params is None:
        return None
    try:
        signature = inspect.signature(getattr(relied.owner, relied.name))
    except (TypeError, ValueError):
        return f"{where} is not a method"
    params = [p for name, p in signature.parameters.items() if name != "self"]
    if _fits(params, relied):
        return None
    expected = ", ".join(relied.params.split())
    return f"{where}{signature} does not match what gpulb {'overrides' if relied.overridden else 'calls'} ({expected})"


def _fits(params: list[inspect.Parameter], relied: Relied) -> bool:
    names, expected = [p.name for p in params], (relied.params or "").split()
    if relied.overridden:
        return names == expected
    extra = [p for p in params if p.name not in expected]
    optional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    takes_all = all(name in names for name in expected)
    return takes_all and all(p.default is not inspect.Parameter.empty or p.kind in optional for p in extra)


def _key_name_problems() -> list[str]:
    """The RQ keys gpulb builds (``gpulb.keys``) against the names the installed RQ gives them."""
    queue = Queue("w", connection=redis.Redis(), serializer=SERIALIZER)  # a Redis client connects only when used
    ours_theirs = {
        "queue key": (keys.rq_queue_key("w"), queue.key),
        "intermediate queue key": (keys.rq_intermediate_key("w"), queue.intermediate_queue_key),
        "queues set key": (keys.rq_queues_key(), Queue.redis_queues_keys),
        "job key": (keys.rq_job_key("j"), Job.key_for("j")),
        "worker key": (keys.rq_worker_key("w"), Worker.redis_worker_namespace_prefix + "w"),
    }
    return [f"its {what} is {theirs!r}, gpulb writes {ours!r}" for what, (ours, theirs) in ours_theirs.items()
            if ours != theirs]  # fmt: skip


# -- the job hash the dispatch script writes --------------------------------------------------------


def job_data(microbatch_id: str) -> bytes:
    """RQ's ``data`` field: the call ``JOB_FUNC(microbatch_id)``, JSON-serialized and compressed as RQ does."""
    return zlib.compress(SERIALIZER.dumps((keys.JOB_FUNC, None, [microbatch_id], {})))  # type: ignore[no-untyped-call]


def description(microbatch_id: str, worker_id: str) -> str:
    return f"gpulb micro-batch {microbatch_id} for {worker_id}"


class RqJobTemplate:
    """The job hash fields of one worker's micro-batches, exactly as RQ's ``Job.save`` writes them.

    Built once from RQ's own ``Job``, then filled in per micro-batch: ``Job.create`` and ``Job.to_dict`` cost more
    than the rest of a dispatch's Python; only the id, the two timestamps, the description and the (compressed)
    call data change from one micro-batch to the next.
    """

    def __init__(self, conn: redis.Redis, worker_id: str, *, timeout_s: int, result_ttl_s: int) -> None:
        job = Job.create(
            keys.JOB_FUNC, args=["mb-template"], id="mb-template", connection=conn, serializer=SERIALIZER,
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


# -- the records gpulb writes in RQ's registries ----------------------------------------------------


def finish_job(
    job: Job, pipe: redis.client.Pipeline, *, result_ttl: int, return_value: Any, worker_name: str,
    execution: Execution | None,
) -> None:  # fmt: skip
    """What RQ writes for a job that succeeded (its worker's ``handle_job_success``, result TTL not 0): the job's
    status and fields, its successful result, its finished registry entry; all on ``pipe``."""
    job.set_status(JobStatus.FINISHED, pipeline=pipe)
    job.save(pipeline=pipe, include_meta=False, include_result=False)  # RQ does not clobber the job's meta either
    Result.create(
        job, Result.Type.SUCCESSFUL, result_ttl, return_value=return_value, worker_name=worker_name, pipeline=pipe,
        execution_id=execution.id if execution else None,
        execution_started_at=execution.created_at if execution else None, execution_ended_at=job.ended_at,
    )  # fmt: skip
    job.finished_job_registry.add(job, result_ttl, pipe)


def fail_job(rq_conn: redis.Redis, job: Job, worker_id: str, reason: str) -> None:
    """Fail ``job`` in RQ's books (status, failed registry, result stream) without running or decoding it."""
    pipe = rq_conn.pipeline()
    pipe.lrem(keys.rq_intermediate_key(worker_id), 0, job.id)
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    ttl = job.failure_ttl or DEFAULT_FAILURE_TTL
    FailedJobRegistry(keys.rq_queue_name(worker_id), connection=rq_conn, serializer=SERIALIZER).add(
        job, ttl=ttl, exc_string=reason, pipeline=pipe
    )
    Result.create_failure(job, ttl, reason, worker_name=worker_id, pipeline=pipe)
    pipe.execute()


def fail_started_job(rq_conn: redis.Redis, worker_id: str, job_id: str, reason: str) -> None:
    """Keep RQ's registries truthful: the started (or finished) job of a dead worker becomes a failed job."""
    try:
        job = Job.fetch(job_id, connection=rq_conn, serializer=SERIALIZER)
    except NoSuchJobError:
        return
    queue = keys.rq_queue_name(worker_id)
    if job.get_status(refresh=False) == JobStatus.FINISHED:  # it admitted its requests into the engine, then died
        FinishedJobRegistry(queue, connection=rq_conn, serializer=SERIALIZER).remove(job)
    else:
        registry = StartedJobRegistry(queue, connection=rq_conn, serializer=SERIALIZER)
        with contextlib.suppress(ValueError):  # RQ: "Execution ... not found": its worker cleaned it up meanwhile
            registry.remove_executions(job)
    fail_job(rq_conn, job, worker_id, reason)


def retire_worker(rq_conn: redis.Redis, worker_id: str) -> None:
    """Mark a dead worker's RQ record dead, so ``rq info`` stops listing it and its id can be reused."""
    worker_key = keys.rq_worker_key(worker_id)
    if rq_conn.exists(worker_key) and not rq_conn.hexists(worker_key, "death"):
        dead = Worker.find_by_key(worker_key, connection=rq_conn, serializer=SERIALIZER)
        if dead is not None:
            dead.register_death()  # type: ignore[no-untyped-call]
