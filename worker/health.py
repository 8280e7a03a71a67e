"""The worker's state as the balancer sees it (starting, idle, busy, unhealthy, draining) and whether its engine
died for good."""

from __future__ import annotations

from gpulb.logs import get_logger
from gpulb.models import WorkerState
from worker.engine import Engine

log = get_logger("gpulb.worker")


class Health:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state = WorkerState.STARTING
        self.engine_ok = True  # the backend's last health check passed
        self.engine_died = False  # the backend says its engine cannot come back: the worker exits with code 3

    def update(self) -> bool:
        """Set the state from the requests in the engine and its health; True if the engine just went unhealthy."""
        if self.state in (WorkerState.DRAINING, WorkerState.STARTING):
            return False
        was = self.state
        if not self.engine_ok:
            self.state = WorkerState.UNHEALTHY
        else:
            self.state = WorkerState.BUSY if self.engine.in_flight else WorkerState.IDLE
        if was is WorkerState.UNHEALTHY and self.state is not WorkerState.UNHEALTHY:
            log.info("engine healthy again: taking work")
        return self.state is WorkerState.UNHEALTHY and was is not WorkerState.UNHEALTHY

    def start_draining(self) -> None:
        self.state = WorkerState.DRAINING

    @property
    def draining(self) -> bool:
        return self.state is WorkerState.DRAINING
