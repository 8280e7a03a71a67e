"""The one function gpulb workers run (``gpulb.keys.JOB_FUNC``). RQ imports it by that name."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

# Set by GpulbWorker around each job: the job runs in the worker process with its loaded backend.
CURRENT_RUNTIME: ContextVar[WorkerRuntime] = ContextVar("gpulb_worker_runtime")


def run_microbatch(microbatch_id: str) -> dict[str, int]:
    """Run micro-batch ``microbatch_id`` on this worker's backend; returns counts for RQ's result."""
    try:
        runtime = CURRENT_RUNTIME.get()
    except LookupError:
        raise RuntimeError("run_microbatch runs only inside a gpulb worker (gpulb worker ...)") from None
    return runtime.run_microbatch(microbatch_id)
