"""A thread that keeps the worker's load key alive, also while a long micro-batch runs."""

from __future__ import annotations

import threading
from collections.abc import Callable

import redis

from gpulb.logs import get_logger

log = get_logger("gpulb.worker.heartbeat")


class Heartbeat:
    """Calls ``beat`` every ``interval_s`` until stopped; ``poke()`` beats at once."""

    def __init__(self, beat: Callable[[], None], interval_s: float) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpulb-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._poke.set()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._beat()
            except redis.RedisError as exc:  # Redis blip: keep beating, the TTL covers the gap
                log.warning("heartbeat failed", error=str(exc))
            except Exception:  # a bug in one beat must not stop the beats: the balancer would reap a live worker
                log.exception("heartbeat failed")
            self._poke.wait(self._interval_s)
            self._poke.clear()
