"""A batch's progress on the terminal: a live bar on a TTY, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

from gpulb.models import BatchStatus

BAR_WIDTH = 28
RATE_WINDOW_S = 10.0


def format_duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RateMeter:
    """Requests finished per second over the last ``RATE_WINDOW_S`` seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, done: int) -> float:
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


def describe(status: BatchStatus, rate: float | None = None) -> str:
    """``5,200/10,000 done (52%) · 12 failed · 1,234 req/s · ETA 0:04`` (no rate: no rate, no ETA)."""
    percent = 100 * status.done / status.total if status.total else 100.0
    parts = [f"{status.done:,}/{status.total:,} done ({percent:.0f}%)"]
    if status.failed:
        parts.append(f"{status.failed:,} failed")
    if status.cancelled:
        parts.append(f"{status.cancelled:,} cancelled")
    if rate is not None:
        parts.append(f"{rate:,.0f} req/s")
    left = status.total - status.done
    if status.finished:
        parts.append("finished")
    elif rate:
        parts.append(f"ETA {format_duration(left / rate)}")
    return " · ".join(parts)


class ProgressReporter:
    """Call :meth:`update` with fresh statuses; :meth:`close` once at the end."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, line_every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.line_every_s = line_every_s
        self.meter = RateMeter()
        self._last_line = 0.0
        self._last_note: str | None = None

    def update(self, status: BatchStatus, *, note: str | None = None) -> None:
        """``note``: a warning to show after the counts while it holds (a plain line is written at once when it
        changes)."""
        now = time.monotonic()
        text = describe(status, self.meter.observe(now, status.done)) + (f" · {note}" if note else "")
        if self.tty:
            self.stream.write(f"\r\x1b[2K{self._bar(status)} {text}")
            self.stream.flush()
        elif now - self._last_line >= self.line_every_s or status.finished or note != self._last_note:
            self.stream.write(f"batch {status.batch_id}: {text}\n")
            self.stream.flush()
            self._last_line = now
        self._last_note = note

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    @staticmethod
    def _bar(status: BatchStatus) -> str:
        filled = BAR_WIDTH * status.done // status.total if status.total else BAR_WIDTH
        return "[" + "█" * filled + "░" * (BAR_WIDTH - filled) + "]"
