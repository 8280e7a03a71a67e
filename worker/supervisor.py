"""``gpulb workers --gpus 0,1,2,3``: one worker process per GPU, kept running.

A worker that exits on its own is started again after a backoff that doubles on each quick
failure (up to ``max_backoff_s``) and resets once a worker has stayed up ``stable_s``. SIGTERM or
SIGINT is forwarded to every worker, which drains (hands queued work back) and exits; the
supervisor waits for them, then exits too. A worker that outlives ``stop_timeout_s`` is killed:
its load key expires and the balancer takes its work back.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from gpulb.errors import WorkerIdInUse
from gpulb.logs import get_logger

log = get_logger("gpulb.workers")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    stable_s: float = 60.0
    stop_timeout_s: float = 120.0


@dataclass(slots=True)
class Child:
    gpu: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    start_after: float = 0.0
    backoff_s: float = 0.0
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    retired: bool = False  # its id is in use by a live worker elsewhere: never started again


class Supervisor:
    """Runs ``spawn(gpu)`` for each GPU and restarts what exits until told to stop."""

    def __init__(
        self, gpus: list[int], spawn: Callable[[int], subprocess.Popen[bytes]], policy: RestartPolicy | None = None
    ) -> None:
        self.children = [Child(gpu) for gpu in gpus]
        self.spawn = spawn
        self.policy = policy or RestartPolicy()
        self.stopping = threading.Event()

    def run(self) -> int:
        """Until SIGTERM/SIGINT; returns the exit code (0: every worker stopped cleanly)."""
        self._install_signal_handlers()
        log.info("supervising workers", gpus=[c.gpu for c in self.children])
        while not self.stopping.is_set():
            for child in self.children:
                self._tend(child)
            self.stopping.wait(0.2)
        return self._stop_all()

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("stopping workers", signal=signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _tend(self, child: Child) -> None:
        now = time.monotonic()
        if child.retired:
            return
        if child.proc is None:
            if now >= child.start_after:
                self._start(child, now)
            return
        code = child.proc.poll()
        if code is None:
            return
        child.exits.append(code)
        if code == WorkerIdInUse.exit_code:
            child.proc, child.retired = None, True
            log.error("worker id in use by a live worker elsewhere: not restarting it", gpu=child.gpu)
            return
        stable = now - child.started_at >= self.policy.stable_s
        child.backoff_s = self.policy.initial_backoff_s if stable or not child.backoff_s else child.backoff_s * 2
        child.backoff_s = min(child.backoff_s, self.policy.max_backoff_s)
        child.proc, child.start_after = None, now + child.backoff_s
        child.restarts += 1
        log.warning("worker exited; restarting", gpu=child.gpu, exit_code=code, restart_in_s=child.backoff_s,
                    restarts=child.restarts)  # fmt: skip

    def _start(self, child: Child, now: float) -> None:
        try:
            child.proc = self.spawn(child.gpu)
        except OSError as exc:
            child.start_after = now + self.policy.max_backoff_s
            log.error("could not start worker", gpu=child.gpu, error=str(exc))
            return
        child.started_at = now
        log.info("worker started", gpu=child.gpu, pid=child.proc.pid)

    def _stop_all(self) -> int:
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.policy.stop_timeout_s
        code = 0
        for child in running:
            proc = child.proc
            assert proc is not None
            try:
                exit_code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it", gpu=child.gpu, pid=proc.pid)
                proc.kill()
                exit_code = proc.wait()
            code = code or (0 if exit_code == 0 else 1)
        log.info("all workers stopped", exit_code=code)
        return code
