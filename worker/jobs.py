"""The one function gpulb's RQ jobs name (``gpulb.keys.JOB_FUNC``): RQ's entry into a gpulb worker.

A GpulbWorker never calls it: it starts each micro-batch itself and hands it to its execution directly. RQ's own
workers call it by that name, in a process where a worker's micro-batch execution is current (the RQ contract
test runs jobs so); it then starts the micro-batch and runs it.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.microbatch_execution import MicroBatchExecution

CURRENT_EXECUTION: ContextVar[MicroBatchExecution] = ContextVar("gpulb_microbatch_execution")


def run_microbatch(microbatch_id: str) -> dict[str, int]:
    """Run micro-batch ``microbatch_id`` on this worker's backend; returns counts for RQ's result."""
    try:
        execution = CURRENT_EXECUTION.get()
    except LookupError:
        raise RuntimeError("run_microbatch runs only inside a gpulb worker (gpulb worker ...)") from None
    return execution.run_microbatch(microbatch_id)
