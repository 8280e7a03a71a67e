"""Streamed requests: their text goes to Redis as the engine makes it, and a reader that went away aborts them.

Backends call a request's ``on_text`` from their own threads; the pieces are queued here and written by one
thread, all that came meanwhile in one pipeline (XADD to each request's stream). Best effort: a piece Redis
refuses is dropped (the result, recorded as always, carries the whole text). Readers follow a stream from its
start and keep to the first run they see: a retry elsewhere starts its text over under another run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

import redis

from gpulb import keys
from gpulb.connection import count_stat
from gpulb.logs import get_logger
from worker.backends.base import TextSink

log = get_logger("gpulb.worker.streaming")
FLUSH_MAX = 4096  # pieces in one pipeline
ABORT_POLL_S = 0.1  # how often the abort flags of streamed requests in the engine are read


class TextStreams:
    """Publishes streamed text (one writer thread) and reads abort flags for the runner."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self._pieces: queue.SimpleQueue[tuple[str, str, str] | None] = queue.SimpleQueue()
        self._watched: frozenset[str] = frozenset()  # batches of streamed requests in the engine
        self._gone: frozenset[str] = frozenset()  # of those, the ones whose reader went away
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._write_loop, name="gpulb-text-streams", daemon=True),
            threading.Thread(target=self._abort_loop, name="gpulb-stream-aborts", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def sink(self, batch_id: str, index: int, run: str) -> TextSink:
        """Where one run of one request puts its text."""
        key = keys.text_stream_key(batch_id, index)
        return lambda text: self._pieces.put((key, run, text)) if text else None

    def aborted(self, batch_ids: Iterable[str]) -> frozenset[str]:
        """Of these batches, those whose reader went away, as last read; watched from now on. No I/O here: the
        runner's control thread calls it, and a Redis that hangs must not stall it."""
        self._watched = frozenset(batch_ids)
        return self._gone & self._watched

    def stop(self) -> None:
        self._stopped.set()
        self._pieces.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def _abort_loop(self) -> None:
        while not self._stopped.wait(ABORT_POLL_S):
            watched = sorted(self._watched)
            if not watched:
                continue
            try:
                flags = self.conn.mget([keys.abort_key(b) for b in watched])
            except redis.RedisError:  # no news: nothing is aborted meanwhile
                continue
            self._gone = frozenset(b for b, flag in zip(watched, flags, strict=True) if flag is not None)

    def _write_loop(self) -> None:
        stopping = False
        while not stopping and (first := self._pieces.get()) is not None:
            batch = [first]
            while len(batch) < FLUSH_MAX:
                try:
                    piece = self._pieces.get_nowait()
                except queue.Empty:
                    break
                if piece is None:
                    stopping = True
                    break
                batch.append(piece)
            try:
                self._write(batch)
            except Exception:  # a piece Redis cannot take (bad text): the results still carry every word
                log.exception("could not publish streamed text", pieces=len(batch))

    def _write(self, pieces: list[tuple[str, str, str]]) -> None:
        pipe = self.conn.pipeline(transaction=False)
        for key, run, text in pieces:
            pipe.xadd(key, {"r": run, "t": text}, maxlen=keys.STREAM_MAXLEN, approximate=True)
        for key in {key for key, _, _ in pieces}:
            pipe.expire(key, keys.STREAM_TTL_S)
        try:
            pipe.execute()
        except redis.RedisError as exc:  # the results still carry every word
            log.warning("could not publish streamed text", pieces=len(pieces), error=str(exc))
            count_stat(self.conn, "dropped_stream_pieces", len(pieces))
