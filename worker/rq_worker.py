"""gpulb's RQ worker: a SimpleWorker (no fork: CUDA does not survive fork) on exactly one queue."""

from __future__ import annotations

from typing import Any

from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from gpulb import keys
from gpulb.keys import JOB_FUNC
from gpulb.logs import get_logger
from gpulb.recovery import record_rq_failure
from worker.jobs import CURRENT_RUNTIME
from worker.runtime import WorkerRuntime

log = get_logger("gpulb.worker")


class GpulbWorker(SimpleWorker):
    """Runs only gpulb's own job function, with the worker's loaded backend at hand."""

    def __init__(self, *args: Any, runtime: WorkerRuntime, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def execute_job(self, job: Job, queue: Queue) -> None:
        reason = self._refusal(job)
        if reason is not None:
            self._refuse(job, queue, reason)
            return
        token = CURRENT_RUNTIME.set(self.runtime)
        try:
            super().execute_job(job, queue)
        finally:
            CURRENT_RUNTIME.reset(token)

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: stop being a dispatch target at once, finish the running batch, then exit."""
        self.runtime.start_draining()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

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
        record_rq_failure(self.connection, job, self.runtime.worker_id, reason)
        self.runtime.conn.hincrby(keys.stats_key(), "refused_jobs", 1)
        self.set_state(WorkerStatus.IDLE)
