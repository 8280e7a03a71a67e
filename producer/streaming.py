"""Reading a streamed request's text as its worker publishes it, then its result.

The worker appends each piece of text to the request's Redis stream, tagged with its run (worker, attempt, try).
A reader keeps to the first run it sees: a retry elsewhere starts its text over, and what was read cannot be
taken back. The result, recorded exactly once as for any request, ends the stream; whatever of its text did not
come as pieces (a backend that cannot stream, pieces Redis refused) comes then, as one last piece.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import redis

from gpulb import keys
from gpulb.errors import ResultTimeout, StreamBroken
from gpulb.models import Result
from gpulb.records import read_result

StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]] | None
POLL_MS = 250  # how long one read blocks for new pieces before the result is looked for


def follow_text(conn: redis.Redis, batch_id: str, index: int, timeout_s: float | None) -> Iterator[str | Result]:
    """Yield the request's text piece by piece, then its :class:`Result`; ``ResultTimeout`` past ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    reader = _Pieces(conn, batch_id, index)
    while True:
        yield from reader.read(POLL_MS)
        result = read_result(conn, batch_id, index)
        if result is not None:
            yield from reader.read(0)  # pieces written before the result was recorded
            if rest := reader.rest_of(result):
                yield rest
            yield result
            return
        if deadline is not None and time.monotonic() > deadline:
            raise ResultTimeout(f"request {keys.request_id(batch_id, index)} not answered within {timeout_s} s")


def abort(conn: redis.Redis, batch_id: str) -> None:
    """Tell the workers that nobody reads this batch any more: its running requests are aborted in the engine."""
    conn.set(keys.abort_key(batch_id), "1", ex=keys.STREAM_TTL_S)


class _Pieces:
    def __init__(self, conn: redis.Redis, batch_id: str, index: int) -> None:
        self.conn, self.key = conn, keys.text_stream_key(batch_id, index)
        self.last_id = "0-0"
        self.run: str | None = None
        self.sent = ""

    def read(self, block_ms: int) -> Iterator[str]:
        """The pieces of the followed run that came since the last read (``block_ms`` 0: do not wait)."""
        reply: StreamReply = self.conn.xread({self.key: self.last_id}, count=1024, block=block_ms or None)  # type: ignore[assignment]
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last_id = entry_id
                self.run = self.run or fields.get("r")
                text = fields.get("t", "")
                if fields.get("r") == self.run and text:
                    self.sent += text
                    yield text

    def rest_of(self, result: Result) -> str:
        """What of the result's text the pieces did not bring; :class:`StreamBroken` if another run answered."""
        if not result.ok or result.text.startswith(self.sent):
            return result.text[len(self.sent) :] if result.ok else ""
        raise StreamBroken(f"{self.key}: the request was run again after {len(self.sent)} characters of its answer "
                           "were sent, and its answer differs: send it again")  # fmt: skip
