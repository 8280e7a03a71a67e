"""Launch a balancer and workers as real processes of the ``gpulb`` CLI (local runs, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from gpulb import keys
from gpulb.errors import GpulbError, WorkerIdInUse

WORKER_ID_IN_USE_EXIT = WorkerIdInUse.exit_code
STOP_POLL_S = 0.1  # how often a stop looks up from waiting on a child to see whether it is forced


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    id: str
    model: str
    tokens_per_s: float = 1000.0
    max_batch: int = 64
    backend: str = "simulated"
    args: tuple[str, ...] = ()  # more worker options, e.g. ("--base-url", URL) or ("--model-path", DIR)


class LocalStack:
    """One balancer and N workers, each a ``python -m gpulb.cli`` child with its log in ``log_dir``."""

    def __init__(
        self,
        redis_url: str,
        workers: list[WorkerSpec],
        log_dir: Path,
        *,
        balancers: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.workers = {w.id: w for w in workers}
        self.log_dir = log_dir
        self.balancer_names = [f"balancer{i + 1}" if i else "balancer" for i in range(balancers)]
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, timeout_s: float = 30.0) -> LocalStack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self.balancer_names:
            self.spawn(name, ["balancer"])
        for spec in self.workers.values():
            self.spawn_worker(spec)
        self.wait_registered(list(self.workers), timeout_s)
        return self

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start again a process that exited (or was killed), under the same name and id."""
        if name in self.workers:
            return self.spawn_worker(self.workers[name])
        return self.spawn(name, ["balancer"])

    def ready(self, conn: redis.Redis, worker_ids: list[str]) -> bool:
        running = not self.balancer_names or bool(conn.exists(keys.balancer_heartbeat_key()))
        return running and all(conn.exists(keys.load_key(w)) for w in worker_ids)

    def spawn_worker(self, spec: WorkerSpec) -> subprocess.Popen[bytes]:
        return self.spawn(spec.id, [
            "worker", "--id", spec.id, "--model", spec.model, "--backend", spec.backend,
            "--tokens-per-s", str(spec.tokens_per_s), "--max-batch", str(spec.max_batch), *spec.args,
        ])  # fmt: skip

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "GPULB_REDIS_URL": self.redis_url, "GPULB_LOG_FORMAT": "json", **self.env}
        log = (self.log_dir / f"{name}.log").open("ab")
        # A session of its own: a Ctrl-C on the terminal reaches only us, and we stop the children in order.
        proc = subprocess.Popen([sys.executable, "-m", "gpulb.cli", *args], stdout=log, stderr=log, env=env,
                                start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def wait_registered(self, worker_ids: list[str], timeout_s: float) -> None:
        conn = redis.Redis.from_url(self.redis_url, decode_responses=True, **self._client_options())
        deadline = time.monotonic() + timeout_s
        try:
            while not self.ready(conn, worker_ids):
                dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
                if dead or time.monotonic() > deadline:
                    raise GpulbError(f"stack did not start (exited: {list(dead)}){_why(dead)}; "
                                     f"see logs in {self.log_dir}")  # fmt: skip
                time.sleep(0.05)  # waiting for child processes to come up
        finally:
            conn.close()

    def _client_options(self) -> dict[str, str]:
        options = {}
        env = {**os.environ, **self.env}
        if env.get("GPULB_REDIS__SSL_CA_CERTS"):
            options["ssl_ca_certs"] = env["GPULB_REDIS__SSL_CA_CERTS"]
        if env.get("GPULB_REDIS__PASSWORD"):
            options["password"] = env["GPULB_REDIS__PASSWORD"]
        return options

    def stop(self, timeout_s: float = 15.0, *, force: threading.Event | None = None) -> dict[str, int | None]:
        """SIGTERM every process (workers drain), then wait for them all until one deadline, ``timeout_s`` away, or
        until ``force`` is set; what still runs then is killed. Returns exit codes (None: was killed)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        return {name: _wait_or_kill(proc, deadline, force) for name, proc in self.procs.items()}

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def _wait_or_kill(proc: subprocess.Popen[bytes], deadline: float, force: threading.Event | None) -> int | None:
    """The exit code of ``proc`` once it exits by ``deadline``; None if it had to be killed (late, or forced)."""
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(STOP_POLL_S, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline or (force is not None and force.is_set()):
                proc.kill()
                proc.wait()
                return None


def _why(exit_codes: dict[str, int | None]) -> str:
    taken = [name for name, code in exit_codes.items() if code == WORKER_ID_IN_USE_EXIT]
    return f": a live worker already holds the id of {', '.join(taken)}" if taken else ""
