"""Scheduling maths: pure functions of a load snapshot, tested on their own.

``least-time``: send the request at the head of the ingress to the worker that would finish it
first — ``(outstanding tokens + its cost) / tokens_per_s`` — and wait (late binding) when that
worker has no credit left, rather than commit the request to a slower worker. Micro-batches are
sized to about ``batch_target_s`` of the chosen worker's time, and shrink near the end of the
backlog so that every worker finishes at about the same moment (water-filling).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

TIE_TOLERANCE = 1e-9


@dataclass(slots=True)
class WorkerView:
    """What the balancer knows of one worker at decision time."""

    worker_id: str
    model: str
    capacity: int  # most requests in one micro-batch
    tokens_per_s: float  # measured EMA; 0 before the first micro-batch
    outstanding_batches: int = 0
    outstanding_tokens: int = 0
    accepting: bool = True

    def speed(self, prior_tokens_per_s: float) -> float:
        return self.tokens_per_s if self.tokens_per_s > 0 else prior_tokens_per_s

    def finish_time(self, extra_tokens: int, prior_tokens_per_s: float) -> float:
        return (self.outstanding_tokens + extra_tokens) / self.speed(prior_tokens_per_s)


def choose_least_time(
    workers: Sequence[WorkerView],
    head_cost: int,
    *,
    max_outstanding: int,
    prior_tokens_per_s: float,
    rng: random.Random,
) -> WorkerView | None:
    """The worker that would finish ``head_cost`` first, or None if that worker has no credit now."""
    live = [w for w in workers if w.accepting]
    if not live:
        return None
    times = [w.finish_time(head_cost, prior_tokens_per_s) for w in live]
    best = min(times)
    tied = [w for w, t in zip(live, times, strict=True) if t <= best * (1 + TIE_TOLERANCE)]
    with_credit = [w for w in tied if w.outstanding_batches < max_outstanding]
    return rng.choice(with_credit) if with_credit else None


def batch_budget(
    chosen: WorkerView,
    workers: Sequence[WorkerView],
    *,
    backlog_tokens: int,
    head_cost: int,
    batch_target_s: float,
    prior_tokens_per_s: float,
) -> int:
    """Tokens to put in the chosen worker's next micro-batch (at least the head request's cost).

    Normally ``batch_target_s`` of the worker's time; near the end, its water-filling share: the
    work that brings it to the moment when the whole fleet would finish the backlog together.
    """
    live = [w for w in workers if w.accepting]
    speed = chosen.speed(prior_tokens_per_s)
    fleet_speed = sum(w.speed(prior_tokens_per_s) for w in live) or speed
    fleet_work = backlog_tokens + sum(w.outstanding_tokens for w in live)
    common_finish_s = fleet_work / fleet_speed
    share = common_finish_s * speed - chosen.outstanding_tokens
    target = speed * batch_target_s
    return max(head_cost, int(min(target, share)), 1)
