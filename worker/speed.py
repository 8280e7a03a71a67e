"""How fast a continuous engine is: generated tokens per second with all its slots busy.

A micro-batch's elapsed time says nothing on a batch server (it lasts about as long as its longest
request, whatever its size), so the speed comes from the engine's own generated-token counter over a
sliding window, sampled by the heartbeat, together with how many sequences ran meanwhile (slot-seconds
used, integrated by the runner at every change, so a burst between two beats counts as it ran). A window in
which the engine ran near its slot limit measures the speed directly; until one is seen, a window at
lower concurrency is scaled up to the slots (an optimistic guess, so that a new worker gets work and
measures itself). An estimate not refreshed for a minute is dropped: the worker reads as unmeasured.
"""

from __future__ import annotations

from collections import deque

WINDOW_S = 5.0
MIN_SPAN_S = 0.5
FULL_SHARE = 0.75  # a window whose mean running is at least this share of the slots counts as full
ALPHA = 0.5
STALE_S = 60.0


class EngineSpeed:
    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self._samples: deque[tuple[float, int, float]] = deque()
        self._estimate = 0.0
        self._full_seen = False
        self._updated_at = 0.0
        self._now = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self._estimate if self._now - self._updated_at <= STALE_S else 0.0

    def sample(self, now: float, generated_tokens: int, busy_slot_s: float) -> None:
        """One reading of the engine's generated-token counter and of the slot-seconds used so far."""
        self._now = now
        self._samples.append((now, generated_tokens, busy_slot_s))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        first, last = self._samples[0], self._samples[-1]
        span, generated = last[0] - first[0], last[1] - first[1]
        if span < MIN_SPAN_S or generated <= 0:
            return
        mean_running = (last[2] - first[2]) / span
        if mean_running <= 0:
            return
        rate = generated / span
        if mean_running >= FULL_SHARE * self.slots:
            self._update(rate * min(1.0, self.slots / mean_running), now, full=True)
        elif not self._full_seen:
            self._update(rate * self.slots / mean_running, now, full=False)
        else:
            self._updated_at = now  # a full measurement stands while the engine runs below its slots

    def _update(self, value: float, now: float, *, full: bool) -> None:
        first_full = full and not self._full_seen
        self._estimate = value if first_full or not self._estimate else ALPHA * value + (1 - ALPHA) * self._estimate
        self._full_seen = self._full_seen or full
        self._updated_at = now
