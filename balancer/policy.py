"""Placement policies: pure functions of the head request and a load snapshot, tested on their own.

Every policy answers one question: which worker gets the next micro-batch, and how large is it?
``least-time`` (the default) binds late: a worker holds at most ``max_outstanding_batches``, and the
head request waits in the ingress when the worker that would finish it first has no credit left.
The baselines (``round-robin``, ``random``, ``least-loaded``, ``power-of-two``) bind early, as
their textbook versions do: the whole backlog is committed to workers as it arrives.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

TIE_TOLERANCE = 1e-9
SAMPLE_ABOVE = 64  # fleets larger than this are sampled, so a decision does not cost O(workers)
SAMPLE_SIZE = 16
UNBOUNDED = 1 << 30


class PolicyName(StrEnum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_LOADED = "least-loaded"
    POWER_OF_TWO = "power-of-two"
    LEAST_TIME = "least-time"
    PREFIX_AFFINITY = "prefix-affinity"


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
    outstanding_requests: int = 0

    def speed(self, prior_tokens_per_s: float) -> float:
        return self.tokens_per_s if self.tokens_per_s > 0 else prior_tokens_per_s

    def finish_time(self, extra_tokens: int, prior_tokens_per_s: float) -> float:
        return (self.outstanding_tokens + extra_tokens) / self.speed(prior_tokens_per_s)


@dataclass(frozen=True, slots=True)
class Head:
    """The request at the front of the ingress, how much work waits behind it, and fleet totals
    (kept up to date by the balancer, so sizing a micro-batch does not cost O(workers))."""

    cost: int
    backlog_tokens: int
    affinity: str = ""
    owner: str = ""  # the worker that served this affinity key last ("" if none)
    fleet_tokens_per_s: float = 0.0  # summed speed of accepting workers
    fleet_outstanding_tokens: int = 0  # summed outstanding work of accepting workers


@dataclass(frozen=True, slots=True)
class Choice:
    worker: WorkerView
    token_budget: int
    respect_affinity: bool = False  # skip requests whose affinity key another worker owns...
    free_owners: tuple[str, ...] = ()  # ...unless it is one of these (too far behind, or gone)


@dataclass(slots=True)
class Context:
    """Settings and the little state a policy may keep between decisions."""

    rng: random.Random
    batch_target_s: float = 0.5
    max_outstanding: int = 2
    prior_tokens_per_s: float = 1000.0
    affinity_abs_s: float = 0.5  # affinity yields when its worker would finish this much later than the best...
    affinity_rel: float = 1.5  # ...and more than this many times later
    turn: int = 0  # round-robin's position
    available: Sequence[WorkerView] | None = None  # workers with credit now, if the caller keeps that index


class Policy(Protocol):
    name: PolicyName
    late_binding: bool

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None: ...


def accepting(workers: Sequence[WorkerView], ctx: Context, limit: int) -> list[WorkerView]:
    return [w for w in workers if w.accepting and w.outstanding_batches < limit]


def speed_blind_budget(ctx: Context, head: Head) -> int:
    """What a speed-blind dispatcher cuts: the same amount of work for every worker."""
    return max(head.cost, int(ctx.prior_tokens_per_s * ctx.batch_target_s))


class RoundRobin:
    name, late_binding = PolicyName.ROUND_ROBIN, False

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None:
        live = sorted(accepting(workers, ctx, UNBOUNDED), key=lambda w: w.worker_id)
        if not live:
            return None
        ctx.turn += 1
        return Choice(live[ctx.turn % len(live)], speed_blind_budget(ctx, head))


class RandomChoice:
    name, late_binding = PolicyName.RANDOM, False

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None:
        live = accepting(workers, ctx, UNBOUNDED)
        return Choice(ctx.rng.choice(live), speed_blind_budget(ctx, head)) if live else None


class LeastLoaded:
    """The textbook one: fewest outstanding requests, blind to speed."""

    name, late_binding = PolicyName.LEAST_LOADED, False

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None:
        live = accepting(workers, ctx, UNBOUNDED)
        if not live:
            return None
        fewest = min(w.outstanding_requests for w in live)
        return Choice(ctx.rng.choice([w for w in live if w.outstanding_requests == fewest]),
                      speed_blind_budget(ctx, head))  # fmt: skip


class PowerOfTwo:
    name, late_binding = PolicyName.POWER_OF_TWO, False

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None:
        live = accepting(workers, ctx, UNBOUNDED)
        if not live:
            return None
        pair = ctx.rng.sample(live, min(2, len(live)))
        return Choice(min(pair, key=lambda w: w.outstanding_requests), speed_blind_budget(ctx, head))


class LeastTime:
    name, late_binding = PolicyName.LEAST_TIME, True

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None:
        chosen = least_time_worker(workers, head.cost, ctx)
        return None if chosen is None else Choice(chosen, batch_budget(chosen, workers, head, ctx))


class PrefixAffinity:
    """Requests of one affinity key go to the worker that served the key before (the owner), unless
    the owner is too far behind (absolute AND relative imbalance guard) or gone: then the least-time
    worker takes the key over. A worker with credit takes what no other worker owns, so the fleet
    stays busy while an owner's requests wait for it."""

    name, late_binding = PolicyName.PREFIX_AFFINITY, True

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None:
        if not head.affinity or not head.owner:
            chosen = least_time_worker(workers, head.cost, ctx)
            return None if chosen is None else Choice(chosen, batch_budget(chosen, workers, head, ctx), True)
        owner = next((w for w in workers if w.worker_id == head.owner), None)
        best = least_time_worker(workers, head.cost, ctx, wait_for_best=False)
        behind = tuple(w.worker_id for w in _candidates(workers, ctx) if _too_far_behind(w, best, head, ctx))
        if owner is None or not owner.accepting or owner.worker_id in behind:
            chosen, free = best, tuple(dict.fromkeys((head.owner, *behind)))
        elif owner.outstanding_batches < ctx.max_outstanding:
            chosen, free = owner, behind
        else:  # the owner is busy: another worker takes what nobody (or a laggard) owns
            others = [w for w in workers if w is not owner]
            chosen, free = least_time_worker(others, head.cost, ctx, wait_for_best=False), behind
        if chosen is None:
            return None
        return Choice(chosen, batch_budget(chosen, workers, head, ctx), True, free)


def _too_far_behind(owner: WorkerView, best: WorkerView | None, head: Head, ctx: Context) -> bool:
    if best is None or best is owner:
        return False
    prior = ctx.prior_tokens_per_s
    owner_t, best_t = owner.finish_time(head.cost, prior), best.finish_time(head.cost, prior)
    return owner_t - best_t > ctx.affinity_abs_s and owner_t > ctx.affinity_rel * best_t


POLICIES: dict[PolicyName, type[Policy]] = {
    p.name: p for p in (RoundRobin, RandomChoice, LeastLoaded, PowerOfTwo, LeastTime, PrefixAffinity)
}


def make_policy(name: PolicyName | str) -> Policy:
    return POLICIES[PolicyName(name)]()


def least_time_worker(
    workers: Sequence[WorkerView], head_cost: int, ctx: Context, *, wait_for_best: bool = True
) -> WorkerView | None:
    """The worker that would finish ``head_cost`` first. With ``wait_for_best``, None if that worker
    has no credit now: the request waits for it rather than go to a slower worker (late binding).

    Large fleets are sampled (``SAMPLE_SIZE`` random workers with credit), so the cost of a
    decision does not grow with the fleet.
    """
    live = [w for w in _candidates(workers, ctx) if w.accepting]
    if not wait_for_best:
        live = [w for w in live if w.outstanding_batches < ctx.max_outstanding]
    if not live:
        return None
    times = [w.finish_time(head_cost, ctx.prior_tokens_per_s) for w in live]
    best = min(times)
    tied = [w for w, t in zip(live, times, strict=True) if t <= best * (1 + TIE_TOLERANCE)]
    with_credit = [w for w in tied if w.outstanding_batches < ctx.max_outstanding]
    return ctx.rng.choice(with_credit) if with_credit else None


def _candidates(workers: Sequence[WorkerView], ctx: Context) -> Sequence[WorkerView]:
    if len(workers) <= SAMPLE_ABOVE:
        return workers
    pool = workers if ctx.available is None else ctx.available  # an index of workers with credit
    if not pool:
        return []
    picks: dict[str, WorkerView] = {}
    for _ in range(4 * SAMPLE_SIZE):  # random probes: O(sample), not O(fleet)
        w = pool[ctx.rng.randrange(len(pool))]
        if w.accepting and w.outstanding_batches < ctx.max_outstanding:
            picks[w.worker_id] = w
            if len(picks) == SAMPLE_SIZE:
                break
    return list(picks.values())


def batch_budget(chosen: WorkerView, workers: Sequence[WorkerView], head: Head, ctx: Context) -> int:
    """Tokens to put in the chosen worker's next micro-batch (at least the head request's cost).

    Normally ``batch_target_s`` of the worker's time; near the end, its water-filling share: the
    work that brings it to the moment when the whole fleet would finish the backlog together.
    """
    speed = chosen.speed(ctx.prior_tokens_per_s)
    target = speed * ctx.batch_target_s
    fleet_speed = head.fleet_tokens_per_s or speed
    common_finish_s = (head.backlog_tokens + head.fleet_outstanding_tokens) / fleet_speed
    share = common_finish_s * speed - chosen.outstanding_tokens
    return max(head.cost, int(min(target, share)), 1)


def fleet_totals(workers: Sequence[WorkerView], prior_tokens_per_s: float) -> tuple[float, int]:
    """(summed speed, summed outstanding tokens) of the accepting workers, for :class:`Head`."""
    live = [w for w in workers if w.accepting]
    return sum(w.speed(prior_tokens_per_s) for w in live), sum(w.outstanding_tokens for w in live)
