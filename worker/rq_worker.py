"""gpulb's RQ worker: a SimpleWorker (no fork: CUDA does not survive fork) on exactly one queue.

RQ's own per-job bookkeeping costs about nine round trips between ``BLMOVE`` returning a job id and
the job function running. Here it takes two, writing the same records: one pipelined read (the job
hash and the micro-batch's entries), then one MULTI/EXEC with everything RQ writes before a job runs
(execution record, started registry, worker and job state, heartbeats) and gpulb's START script. So
`rq info`, rq-dashboard and RQ's registries see jobs exactly as with RQ's own loop.

This is the one place outside ``gpulb.rq_books`` that imports ``rq``. It overrides RQ methods, so ``RELIED_ON``
lists every RQ method and attribute it uses, with the arguments it expects; :func:`check_installed_rq` checks them
against the installed RQ when a worker starts.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import redis
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.utils import as_text, get_version, now
from rq.worker import SimpleWorker, WorkerStatus

from gpulb import keys, rq_books
from gpulb.connection import BLIP_ERRORS
from gpulb.keys import JOB_FUNC
from gpulb.logs import get_logger
from gpulb.rq_books import Relied
from worker.engine import Engine
from worker.health import Health
from worker.microbatch_execution import MicroBatchExecution

log = get_logger("gpulb.worker")
T = TypeVar("T")
LMOVE_MIN_REDIS = (6, 2, 0)  # RQ dequeues with BLMOVE (into the intermediate list) from this version on
RECENT_HEARTBEAT_S = 1.0  # RQ's worker hash lives worker_ttl + 60 s: a plain heartbeat sooner is redundant
# RQ reads its command channel (`rq shutdown`...) in a thread that waits up to 60 s per poll, and redis-py >= 8.2's
# PubSubWorkerThread.stop() waits for the poll to end: a worker asked to stop hung up to a minute before draining.
COMMAND_POLL_S = 1.0


RELIED_ON = (
    Relied(SimpleWorker, "subscribe", "", overridden=True),
    Relied(SimpleWorker, "execute_job", "job queue", overridden=True),
    Relied(SimpleWorker, "request_stop", "signum frame", overridden=True),
    Relied(SimpleWorker, "heartbeat", "timeout pipeline", overridden=True),
    Relied(SimpleWorker, "dequeue_job_and_maintain_ttl", "timeout max_idle_time", overridden=True),
    Relied(SimpleWorker, "prepare_execution", "job", overridden=True),
    Relied(SimpleWorker, "prepare_job_execution", "job remove_from_intermediate_queue", overridden=True),
    Relied(SimpleWorker, "handle_execution_ended", "job queue heartbeat_ttl", overridden=True),
    Relied(SimpleWorker, "handle_job_success", "job queue started_job_registry", overridden=True),
    Relied(Job, "perform", "", overridden=True),
    Relied(SimpleWorker, "perform_job", "job queue"),
    Relied(SimpleWorker, "set_state", "state pipeline"),
    Relied(SimpleWorker, "get_state", ""),
    Relied(SimpleWorker, "procline", "message"),
    Relied(SimpleWorker, "run_maintenance_tasks", ""),
    Relied(SimpleWorker, "should_run_maintenance_tasks"),
    Relied(SimpleWorker, "set_current_job_id", "job_id pipeline"),
    Relied(SimpleWorker, "set_current_job_working_time", "current_job_working_time pipeline"),
    Relied(SimpleWorker, "get_heartbeat_ttl", "job"),
    Relied(SimpleWorker, "increment_successful_job_count", "pipeline"),
    Relied(SimpleWorker, "increment_total_working_time", "job_execution_time pipeline"),
    Relied(SimpleWorker, "cleanup_execution", "job pipeline"),
    Relied(SimpleWorker, "handle_warm_shutdown_request", ""),
    Relied(SimpleWorker, "request_force_stop", "signum frame"),
    Relied(SimpleWorker, "get_redis_server_version", ""),
    Relied(SimpleWorker, "handle_payload", "message"),
    Relied(SimpleWorker, "pubsub_channel_name"),
    Relied(SimpleWorker, "exponential_backoff_factor"),
    Relied(SimpleWorker, "max_connection_wait_time"),
    Relied(Job, "restore", "raw_data"),
    Relied(Job, "prepare_for_execution", "worker_name pipeline"),
    Relied(Job, "heartbeat", "timestamp ttl pipeline"),
    Relied(Job, "get_result_ttl", "default_ttl"),
    Relied(Job, "cleanup", "ttl pipeline remove_from_queue"),
    Relied(Job, "func_name"),
    Relied(Job, "func"),
    Relied(Job, "args"),
    Relied(Job, "kwargs"),
    Relied(Execution, "create", "job ttl pipeline worker_name"),
    Relied(Queue, "lmove", "connection queue_key timeout"),
    Relied(Queue, "intermediate_queue_key"),
)


def check_installed_rq() -> None:
    """Fail at start-up, naming what is missing, if the installed RQ is not one this worker can run on."""
    rq_books.check_rq(RELIED_ON)


class GpulbJob(Job):
    """RQ's Job for one micro-batch. GpulbWorker starts the micro-batch in its start pipeline and hands it over as
    the job's ``run_started`` (what it started, bound to what runs it), which ``perform`` runs: no PERSIST round
    trip of its own (the start pipeline persisted the job), and what it returns is kept for the success
    bookkeeping. (RQ's ``get_current_job`` is not set meanwhile: gpulb does not read it.)
    """

    run_started: Callable[[], dict[str, int]] | None = None
    returned: dict[str, int] | None = None

    def perform(self) -> Any:
        if self.run_started is None:
            raise RuntimeError(f"micro-batch job {self.id} runs only in the GpulbWorker that started it")
        self.returned = self.run_started()
        return self.returned


class GpulbWorker(SimpleWorker):
    """Runs only gpulb's own micro-batch jobs: starts each, then hands it to the worker's micro-batch execution.

    Before dequeuing, it waits for room in the engine; a stop request drains the worker's health first.
    """

    def __init__(
        self, *args: Any, engine: Engine, health: Health, microbatches: MicroBatchExecution, **kwargs: Any
    ) -> None:
        kwargs.setdefault("job_class", GpulbJob)
        super().__init__(*args, **kwargs)
        self.engine, self.health, self.microbatches = engine, health, microbatches
        self._entries: bytes | None = None  # the dequeued micro-batch's members, read with its job hash
        self._start_pipe: redis.client.Pipeline | None = None
        self._beat_ttl: int | None = None  # the TTL the last heartbeat set; None: RQ's default (worker_ttl + 60)
        self._blocked_in_dequeue = False  # in BLMOVE: where a stop request may interrupt the main thread

    @classmethod
    def on_own_queue(
        cls, engine: Engine, health: Health, microbatches: MicroBatchExecution, *, max_connection_wait_s: float
    ) -> GpulbWorker:
        """The RQ worker named by the worker's id, on the one queue of that name; its jobs are JSON."""
        serializer, ctx = rq_books.SERIALIZER, microbatches.ctx
        queue = Queue(keys.rq_queue_name(ctx.worker_id), connection=ctx.rq_conn, serializer=serializer)
        worker = cls([queue], name=ctx.worker_id, connection=ctx.rq_conn, serializer=serializer, engine=engine,
                     health=health, microbatches=microbatches)  # fmt: skip
        worker.max_connection_wait_time = max_connection_wait_s
        return worker

    def subscribe(self) -> None:
        """RQ's subscription to its command channel, polled every ``COMMAND_POLL_S`` instead of every 60 s."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=COMMAND_POLL_S, daemon=True, exception_handler=self._command_channel_error
        )

    def _command_channel_error(self, exc: BaseException, pubsub: Any, thread: Any) -> None:
        """As RQ's own handler: a lost connection is retried (redis-py resubscribes), anything else ends the thread."""
        if not isinstance(exc, redis.ConnectionError):
            raise exc
        log.warning("rq command channel: redis unavailable", error=str(exc), retry_in_s=COMMAND_POLL_S)
        time.sleep(COMMAND_POLL_S)

    def execute_job(self, job: Job, queue: Queue) -> None:
        reason = self._refusal(job)
        if reason is not None:
            self._refuse(job, queue, reason)
            return
        # SimpleWorker.execute_job, less a second write of the idle state after a success
        self.prepare_execution(job)
        self.perform_job(job, queue)
        if self.get_state() != WorkerStatus.IDLE:
            self.set_state(WorkerStatus.IDLE)

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: stop being a dispatch target at once, finish the running batch, then exit.

        RQ raises StopRequested from the signal handler, wherever the main thread is. Out of a BLMOVE that is
        clean (redis-py drops the connection); anywhere else it may be swallowed (a logging call catches it, and
        the worker never drains) or cut a pipeline in half. So only a worker blocked in BLMOVE is interrupted;
        otherwise the dequeue loop sees the drain and ends. A second signal is a cold stop, as with RQ.
        """
        self.health.start_draining()
        if self._blocked_in_dequeue:
            super().request_stop(signum, frame)  # type: ignore[no-untyped-call]
            return
        self.handle_warm_shutdown_request()  # type: ignore[no-untyped-call]
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)

    # -- fewer round trips, the same books ------------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: redis.client.Pipeline | None = None) -> None:
        """RQ's heartbeat (HSET and EXPIRE of the worker hash) in one round trip instead of two.

        A plain heartbeat within a second of a plain one is skipped (the worker hash lives for minutes);
        never after one that set a job's TTL, which may be shorter than the wait for the next job.
        """
        if pipeline is None and timeout is None and self._beat_recently():
            return
        self._beat_ttl = timeout
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)
            pipe.execute()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's dequeue on our one queue: idle state and heartbeat in one trip, then BLMOVE, then one read."""
        if max_idle_time is not None or len(self.queues) != 1 or get_version(self.connection) < LMOVE_MIN_REDIS:
            return self._blocking(lambda: super(GpulbWorker, self).dequeue_job_and_maintain_ttl(timeout, max_idle_time))
        if self.get_state() != WorkerStatus.IDLE or not self._beat_recently():
            with self.connection.pipeline(transaction=False) as pipe:
                self.set_state(WorkerStatus.IDLE, pipeline=pipe)
                self.heartbeat(pipeline=pipe)
                pipe.execute()
        self.procline(f"Listening on {self.queues[0].name}")  # type: ignore[no-untyped-call]
        backoff_s = 1.0
        while True:
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()  # type: ignore[no-untyped-call]
            try:
                return self._dequeue(self.queues[0], timeout)
            except DequeueTimeout:
                self.heartbeat()
            except BLIP_ERRORS as exc:  # as RQ does for a lost connection: wait, retry; a full Redis alike
                log.warning("rq dequeue: redis unavailable", error=str(exc), retry_in_s=backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * self.exponential_backoff_factor, self.max_connection_wait_time)

    def _blocking(self, wait: Callable[[], T]) -> T | None:
        """Run a blocking dequeue where a stop request may interrupt it; None if asked to stop before it began
        (the flag is set first, so that a request coming between the check and the wait still interrupts)."""
        self._blocked_in_dequeue = True
        try:
            return None if self.health.draining else wait()
        finally:
            self._blocked_in_dequeue = False

    def _dequeue(self, queue: Queue, timeout: int | None) -> tuple[Job, Queue] | None:
        """Once the engine has a free slot: BLMOVE into the intermediate list (as RQ), then the job hash and
        micro-batch entries in one read. Until then the micro-batch stays queued, where it can be handed back."""
        while True:
            if self.health.draining:  # asked to stop (request_stop): RQ's loop ends on None
                return None
            if not self.engine.wait_for_room():
                self.heartbeat()
                continue
            popped = self._blocking(lambda: Queue.lmove(self.connection, queue.key, timeout))
            if popped is None:
                return None
            job_id = as_text(popped[1])
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.rq_job_key(job_id))
                pipe.hget(keys.microbatch_key(job_id), "entries")
                raw, self._entries = pipe.execute()
            if raw:  # a job that no longer exists is skipped, as RQ does
                job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
                job.restore(raw)
                job.redis_server_version = self.get_redis_server_version()  # type: ignore[no-untyped-call]
                return job, queue

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's execution record and busy state, queued on the start pipeline (sent with the rest)."""
        self._start_pipe = pipe = self.connection.pipeline()
        self.execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name)
        self.set_state(WorkerStatus.BUSY, pipeline=pipe)
        return self.execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ's pre-run bookkeeping and gpulb's START in one MULTI/EXEC; what it started is handed to the job."""
        pipe, self._start_pipe = self._start_pipe or self.connection.pipeline(), None
        entries, self._entries = self._entries, None
        with pipe:
            self._queue_rq_start(pipe, job, remove_from_intermediate_queue)
            start = self.microbatches.queue_start(pipe, job.id, entries)
            try:
                replies = pipe.execute(raise_on_error=False)
            except BaseException:
                self.microbatches.abandon_start(job.id)
                raise
        for reply in replies[: len(replies) - (start is not None)]:
            if isinstance(reply, Exception):
                raise reply
        started = self.microbatches.started(job.id, start, replies[-1] if start is not None else None)
        if isinstance(job, GpulbJob):
            job.run_started = partial(self.microbatches.run, started)
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")  # type: ignore[no-untyped-call]

    def _queue_rq_start(self, pipe: redis.client.Pipeline, job: Job, remove_from_intermediate: bool) -> None:
        """What RQ's ``prepare_job_execution`` writes (its job heartbeat, rewritten at once, aside), and the
        PERSIST of ``Job.perform``."""
        self.set_current_job_id(job.id, pipeline=pipe)
        self.set_current_job_working_time(0, pipeline=pipe)
        ttl = self.get_heartbeat_ttl(job)
        self.heartbeat(ttl, pipeline=pipe)
        job.prepare_for_execution(self.name, pipeline=pipe)  # also sets last_heartbeat: RQ's job.heartbeat is moot
        if remove_from_intermediate:
            origin = next((q for q in self.queues if q.name == job.origin), None)  # no new Queue per job
            intermediate = (origin or Queue(job.origin, connection=self.connection)).intermediate_queue_key
            pipe.lrem(intermediate, 1, job.id)
        pipe.persist(job.key)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """After a success, RQ's job heartbeat here goes out with the success bookkeeping instead."""
        if job.get_status(refresh=False) == JobStatus.FAILED:
            super().handle_execution_ended(job, queue, heartbeat_ttl)
            return
        job.ended_at = now()

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        """RQ's success bookkeeping, the worker's return to idle and its heartbeat in one MULTI/EXEC.

        RQ's own first WATCHes the job's dependents to enqueue them; gpulb's jobs, created by the
        dispatch script, never have dependents (nor repeats: those still go RQ's way).
        """
        if job.repeats_left:
            super().handle_job_success(job, queue, started_job_registry)
            return
        ended_at, started_at = job.ended_at or now(), job.started_at or now()
        with self.connection.pipeline() as pipe:
            job.heartbeat(ended_at, 0, pipeline=pipe)  # what RQ's handle_execution_ended writes
            self.increment_successful_job_count(pipeline=pipe)
            self.increment_total_working_time(ended_at - started_at, pipe)
            self._save_success(job, pipe)
            self.cleanup_execution(job, pipeline=pipe)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            self.heartbeat(pipeline=pipe)
            pipe.execute()

    def _save_success(self, job: Job, pipe: redis.client.Pipeline) -> None:
        """The job's finished status, result and finished registry entry, or its deletion (result TTL 0)."""
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        if result_ttl != 0:
            returned = job.returned if isinstance(job, GpulbJob) else None
            rq_books.finish_job(job, pipe, result_ttl=result_ttl, return_value=returned, worker_name=self.name,
                                execution=self.execution)  # fmt: skip
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)

    def _beat_recently(self) -> bool:
        """The last heartbeat was plain (RQ's default TTL) and less than a second ago."""
        last = self.last_heartbeat
        return self._beat_ttl is None and last is not None and (now() - last).total_seconds() < RECENT_HEARTBEAT_S

    # -- refusing foreign jobs ------------------------------------------------------------------

    @staticmethod
    def _refusal(job: Job) -> str | None:
        try:
            func_name = job.func_name  # decoding uses the JSON serializer: a pickle payload fails here
        except Exception as exc:
            return f"undecodable job payload ({type(exc).__name__})"
        if func_name != JOB_FUNC:
            return f"foreign job function {func_name!r} refused (gpulb workers run only {JOB_FUNC})"
        return None

    def _refuse(self, job: Job, queue: Queue, reason: str) -> None:
        """Fail the job in RQ's books without decoding it further (RQ's own paths read func_name)."""
        log.error("job refused", job_id=job.id, reason=reason)
        ctx = self.microbatches.ctx
        rq_books.fail_job(self.connection, job, ctx.worker_id, reason)
        ctx.conn.hincrby(keys.stats_key(), "refused_jobs", 1)
        self.set_state(WorkerStatus.IDLE)
