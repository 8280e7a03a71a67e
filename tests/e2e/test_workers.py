"""``gpulb workers --gpus``: one worker per GPU, restarted when it dies, drained on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from gpulb import keys
from gpulb.cli.stack import LocalStack
from producer import Client

pytestmark = pytest.mark.e2e
HOST = socket.gethostname()


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def pid_of(conn: redis.Redis, worker_id: str) -> int:
    return int(conn.hget(keys.load_key(worker_id), "pid") or 0)  # type: ignore[arg-type]


class TestSupervisor:
    def test_one_worker_per_gpu_restarted_after_a_crash_and_drained_on_sigterm(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path
    ) -> None:
        ids = [f"{HOST}-gpu0", f"{HOST}-gpu1"]
        log = (tmp_path / "workers.log").open("wb")
        env = {**os.environ, "GPULB_WORKER__LOAD_TTL_S": "2", "GPULB_LOG_FORMAT": "json"}
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "gpulb.cli", "--redis-url", redis_url, "workers", "--gpus", "0,1",
             "--model", "m", "--tokens-per-s", "20000"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            wait_for(lambda: all(pid_of(conn, w) for w in ids), 30, "both workers to register")
            assert [conn.hget(keys.load_key(w), "gpu") for w in ids] == ["0", "1"]
            first_pid = pid_of(conn, ids[0])
            os.kill(first_pid, signal.SIGKILL)
            wait_for(lambda: pid_of(conn, ids[0]) not in (0, first_pid), 30, "the killed worker to come back")
            with LocalStack(redis_url, [], tmp_path / "stack"), Client(redis_url) as client:
                results = client.submit_batch([f"prompt {i}" for i in range(200)], model="m", max_tokens=4).results(
                    timeout=60
                )
            assert [r.index for r in results] == list(range(200)) and all(r.ok for r in results)
            assert {r.worker for r in results} <= set(ids)
        finally:
            supervisor.send_signal(signal.SIGTERM)
            code = supervisor.wait(60)
            log.close()
        assert code == 0
        assert conn.smembers(keys.workers_key()) == set()  # both deregistered: drained, not expired
        output = (tmp_path / "workers.log").read_text()
        assert '"event": "worker exited; restarting"' in output and '"all workers stopped"' in output

    def test_bad_gpu_list_is_refused_with_a_clear_error(self, redis_url: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "gpulb.cli", "--redis-url", redis_url, "workers", "--gpus", "0,0", "--model", "m"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 1
        assert "--gpus '0,0': expected distinct, non-negative GPU indices" in done.stderr
