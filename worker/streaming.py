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


class TextStreams:
    """Publishes streamed text (one writer thread) and reads abort flags for the runner."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self._pieces: queue.SimpleQueue[tuple[str, str, str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="gpulb-text-streams", daemon=True)
        self._thread.start()

    def sink(self, batch_id: str, index: int, run: str) -> TextSink:
        """Where one run of one request puts its text."""
        key = keys.text_stream_key(batch_id, index)
        return lambda text: self._pieces.put((key, run, text)) if text else None

    def aborted(self, batch_ids: Iterable[str]) -> set[str]:
        """The batches whose reader went away; none when Redis cannot say."""
        wanted = sorted(set(batch_ids))
        if not wanted:
            return set()
        try:
            flags = self.conn.mget([keys.abort_key(b) for b in wanted])
        except redis.RedisError:
            return set()
        return {batch_id for batch_id, flag in zip(wanted, flags, strict=True) if flag is not None}

    def stop(self) -> None:
        self._pieces.put(None)
        self._thread.join(timeout=5)

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
            self._write(batch)

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
