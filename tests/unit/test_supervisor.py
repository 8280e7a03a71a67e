"""`gpulb workers`' supervisor: what it restarts and what it gives up on."""

from __future__ import annotations

import subprocess
import sys

from gpulb.errors import WorkerIdInUse
from worker.supervisor import RestartPolicy, Supervisor

QUICK = RestartPolicy(initial_backoff_s=0.0, max_backoff_s=0.0, stable_s=60.0, stop_timeout_s=5.0)


def exiting_with(code: int) -> tuple[list[int], Supervisor]:
    spawned: list[int] = []

    def spawn(gpu: int) -> subprocess.Popen[bytes]:
        spawned.append(gpu)
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])

    return spawned, Supervisor([0], spawn, QUICK)


def tend_until_exits(supervisor: Supervisor, exits: int) -> None:
    child = supervisor.children[0]
    while len(child.exits) < exits:
        supervisor._tend(child)
        if child.proc is not None:
            child.proc.wait()


class TestRestarts:
    def test_a_crashed_worker_is_started_again(self) -> None:
        spawned, supervisor = exiting_with(1)
        tend_until_exits(supervisor, 3)
        supervisor._tend(supervisor.children[0])
        assert spawned == [0, 0, 0, 0] and supervisor.children[0].exits == [1, 1, 1]

    def test_a_worker_whose_id_is_in_use_is_not_started_again(self) -> None:
        """A live worker elsewhere holds the id: a restart would be refused the same way, forever."""
        spawned, supervisor = exiting_with(WorkerIdInUse.exit_code)
        tend_until_exits(supervisor, 1)
        for _ in range(5):
            supervisor._tend(supervisor.children[0])
        assert spawned == [0] and supervisor.children[0].retired and supervisor.children[0].proc is None
