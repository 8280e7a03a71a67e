"""How full engines were kept: the mean share of their slots busy over a time window.

A request holds a slot from when it started on its worker to when it finished; requests beyond an
engine's slots wait in its queue, so the count is capped at the slots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple


class Span(NamedTuple):
    engine: str
    started_at: float
    finished_at: float


def busy_shares(spans: Iterable[Span], slots: Mapping[str, int], start: float, end: float) -> dict[str, float]:
    """Per engine, the mean share of its slots busy between ``start`` and ``end``."""
    events: dict[str, list[tuple[float, int]]] = {engine: [] for engine in slots}
    for s in spans:
        if s.engine in events:
            events[s.engine] += [(s.started_at, 1), (s.finished_at, -1)]
    width = end - start
    if width <= 0:
        return dict.fromkeys(slots, 1.0)
    return {engine: _busy_slot_s(sorted(ev), cap, start, end) / (width * cap) for engine, (cap, ev) in
            ((e, (slots[e], events[e])) for e in slots)}  # fmt: skip


def busy_share(spans: Iterable[Span], slots: Mapping[str, int], start: float, end: float) -> float:
    """The mean share of all the engines' slots busy between ``start`` and ``end``."""
    shares = busy_shares(spans, slots, start, end)
    return sum(shares[e] * slots[e] for e in slots) / max(1, sum(slots.values()))


def _busy_slot_s(events: list[tuple[float, int]], cap: int, start: float, end: float) -> float:
    busy, running, last = 0.0, 0, start
    for at, step in events:
        at = min(max(at, start), end)
        busy += min(running, cap) * (at - last)
        running, last = running + step, at
    return busy
