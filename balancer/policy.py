"""Placement policies: pure functions of the head request and a load snapshot, tested on their own.

Every policy answers one question: which worker gets the next micro-batch, and how large is it?
``least-time`` (the default) binds late. A worker's credit is counted in engine slots when its engine
batches continuously (``slots > 0``: it may hold ``slots + queue_slots`` requests, so its engine stays
full and a few wait for the next free slot), and in micro-batches for a static-batch engine
(``max_outstanding_batches``). The head request goes to the worker that would finish it first; a
continuous worker with free slots also takes it while its finish time stays within the fleet's
expected common finish, so that every engine is kept full while the backlog lasts and a slow engine
stops taking work only in the tail, where its last request would end after everyone else.
The baselines (``round-robin``, ``random``, ``least-loaded``, ``power-of-two``) bind early, as
their textbook versions do: the whole backlog is committed to workers as it arrives.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from gpulb.models import refill_batch

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


# Output lengths are heavy-tailed and the balancer knows only their mean: a request a slow engine starts late
# may run three times that. Holding a continuous engine to 1.15x the mean's time at its per-sequence rate keeps
# slow engines from starting the tail's long requests, and leaves them full until then (bench.fleet, 1:1:2:4,
# 2026-12-07, makespan / fluid and slots busy: 1.0: 1.28-1.32x, 90.5%; 1.1: 1.25-1.34x, 87.3-91.0%;
# 1.15: 1.22-1.27x, 87.4-90.4%; 1.25: 1.20-1.24x but 83.9-85.8%: slow engines half empty before the backlog ran out).
TAIL_RISK = 1.15


@dataclass(slots=True)
class WorkerView:
    """What the balancer knows of one worker at decision time."""

    worker_id: str
    model: str
    capacity: int  # most requests in one micro-batch
    tokens_per_s: float  # measured (with all slots busy, for a continuous engine); 0 before it has measured
    outstanding_batches: int = 0
    outstanding_tokens: int = 0
    accepting: bool = True
    outstanding_requests: int = 0
    slots: int = 0  # sequences its engine runs at once; 0 for a static-batch engine (one micro-batch at a time)
    queue_slots: int = 0  # requests it may hold beyond its slots, ready for the next free slot

    def speed(self, prior_tokens_per_s: float) -> float:
        return self.tokens_per_s if self.tokens_per_s > 0 else prior_tokens_per_s

    def finish_time(self, extra_tokens: int, prior_tokens_per_s: float) -> float:
        """When it would finish everything it holds plus ``extra_tokens`` of work.

        On a continuous engine a request also never ends sooner than its own length at the per-sequence
        rate of a full engine: a long request on a slow GPU decides the makespan in the tail. That length is
        only expected (answers stop at their own end), so it counts ``TAIL_RISK`` times. A worker
        that has not measured itself yet is not held to that (it must get work to measure its speed).
        """
        speed = self.speed(prior_tokens_per_s)
        fluid = (self.outstanding_tokens + extra_tokens) / speed
        if not self.slots or self.tokens_per_s <= 0:
            return fluid
        return max(fluid, TAIL_RISK * extra_tokens * self.slots / speed)

    def has_credit(self, max_outstanding: int) -> bool:
        if self.slots:
            return self.outstanding_requests < self.slots + self.queue_slots
        return self.outstanding_batches < max_outstanding

    def free_requests(self) -> int:
        """Requests it may still take (continuous engines; a static one takes ``capacity``)."""
        if not self.slots:
            return self.capacity
        return max(0, min(self.capacity, self.slots + self.queue_slots - self.outstanding_requests))

    def min_batch(self) -> int:
        """The smallest micro-batch worth sending while plenty waits: half its queue (fewer, larger RQ jobs)."""
        return refill_batch(self.capacity, self.queue_slots) if self.slots else 1


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
    backlog_requests: int = 1 << 30  # requests waiting in the ingress (unknown: plenty)

    def common_finish_s(self, fallback_tokens_per_s: float) -> float:
        """When the fleet would finish the backlog and everything it holds, all working to the end."""
        speed = self.fleet_tokens_per_s or fallback_tokens_per_s
        return (self.backlog_tokens + self.fleet_outstanding_tokens) / speed


@dataclass(frozen=True, slots=True)
class Choice:
    worker: WorkerView
    token_budget: int
    respect_affinity: bool = False  # skip requests whose affinity key another worker owns...
    free_owners: tuple[str, ...] = ()  # ...unless it is one of these (too far behind, or gone)
    max_requests: int = 0  # the most requests in the micro-batch; 0: the worker's capacity


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
    """Workers a speed-blind baseline may pick: it binds early, so engine slots do not limit it."""
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
        chosen = least_time_worker(workers, head, ctx)
        return None if chosen is None else sized_choice(chosen, workers, head, ctx)


class PrefixAffinity:
    """Requests of one affinity key go to the worker that served the key before (the owner), unless
    the owner is too far behind (absolute AND relative imbalance guard) or gone: then the least-time
    worker takes the key over. A worker with credit takes what no other worker owns, so the fleet
    stays busy while an owner's requests wait for it."""

    name, late_binding = PolicyName.PREFIX_AFFINITY, True

    def choose(self, workers: Sequence[WorkerView], head: Head, ctx: Context) -> Choice | None:
        if not head.affinity or not head.owner:
            chosen = least_time_worker(workers, head, ctx)
            return None if chosen is None else sized_choice(chosen, workers, head, ctx, respect_affinity=True)
        owner = next((w for w in workers if w.worker_id == head.owner), None)
        best = least_time_worker(workers, head, ctx, wait_for_best=False)
        behind = tuple(w.worker_id for w in _candidates(workers, ctx) if _too_far_behind(w, best, head, ctx))
        if owner is None or not owner.accepting or owner.worker_id in behind:
            chosen, free = best, tuple(dict.fromkeys((head.owner, *behind)))
        elif owner.has_credit(ctx.max_outstanding):
            chosen, free = owner, behind
        else:  # the owner is busy: another worker takes what nobody (or a laggard) owns
            others = [w for w in workers if w is not owner]
            chosen, free = least_time_worker(others, head, ctx, wait_for_best=False), behind
        if chosen is None:
            return None
        return sized_choice(chosen, workers, head, ctx, respect_affinity=True, free_owners=free)


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
    workers: Sequence[WorkerView], head: Head, ctx: Context, *, wait_for_best: bool = True
) -> WorkerView | None:
    """The worker that would finish the head request first. With ``wait_for_best``, None if that worker
    has no credit now: the request waits for it rather than go to a slower worker (late binding).

    A continuous engine with free slots takes it too if it would finish it by the fleet's common finish
    time: an engine kept full gains throughput at no one's expense until the tail. There a slow engine's
    own time for the request exceeds the common finish, and the request waits for a faster one.

    Large fleets are sampled (``SAMPLE_SIZE`` random workers with credit), so the cost of a
    decision does not grow with the fleet.
    """
    live = [w for w in _candidates(workers, ctx) if w.accepting]
    if not wait_for_best:
        live = [w for w in live if w.has_credit(ctx.max_outstanding)]
    if not live:
        return None
    times = [w.finish_time(head.cost, ctx.prior_tokens_per_s) for w in live]
    best = min(times)
    common = head.common_finish_s(ctx.prior_tokens_per_s)
    fits = [
        (w, t) for w, t in zip(live, times, strict=True)
        if t <= (max(best, common) if w.slots else best) * (1 + TIE_TOLERANCE) and _ready(w, head, ctx)
    ]  # fmt: skip
    if not fits:
        return None
    soonest = min(t for _, t in fits)
    return ctx.rng.choice([w for w, t in fits if t <= soonest * (1 + TIE_TOLERANCE)])


def _ready(worker: WorkerView, head: Head, ctx: Context) -> bool:
    """It has credit, and (a continuous engine) room for a micro-batch worth an RQ job, or the backlog is short."""
    if not worker.has_credit(ctx.max_outstanding):
        return False
    return worker.free_requests() >= min(worker.min_batch(), head.backlog_requests)


def _candidates(workers: Sequence[WorkerView], ctx: Context) -> Sequence[WorkerView]:
    if len(workers) <= SAMPLE_ABOVE:
        return workers
    pool = workers if ctx.available is None else ctx.available  # an index of workers with credit
    if not pool:
        return []
    picks: dict[str, WorkerView] = {}
    for _ in range(4 * SAMPLE_SIZE):  # random probes: O(sample), not O(fleet)
        w = pool[ctx.rng.randrange(len(pool))]
        if w.accepting and w.has_credit(ctx.max_outstanding):
            picks[w.worker_id] = w
            if len(picks) == SAMPLE_SIZE:
                break
    return list(picks.values())


def batch_budget(chosen: WorkerView, workers: Sequence[WorkerView], head: Head, ctx: Context) -> int:
    """Tokens to put in the chosen worker's next micro-batch (at least the head request's cost).

    Normally ``batch_target_s`` of the worker's time (a static engine) or all its free slots (a continuous
    one); near the end, its water-filling share: the work that brings it to the moment when the whole fleet
    would finish the backlog together.
    """
    speed = chosen.speed(ctx.prior_tokens_per_s)
    share = head.common_finish_s(speed) * speed - chosen.outstanding_tokens
    target = share if chosen.slots else min(speed * ctx.batch_target_s, share)
    return max(head.cost, int(min(target, 1 << 62)), 1)


def sized_choice(
    chosen: WorkerView, workers: Sequence[WorkerView], head: Head, ctx: Context, *,
    respect_affinity: bool = False, free_owners: tuple[str, ...] = (),
) -> Choice:  # fmt: skip
    """The choice of ``chosen``, with its micro-batch's token budget and request limit."""
    budget = batch_budget(chosen, workers, head, ctx)
    return Choice(chosen, budget, respect_affinity, free_owners, chosen.free_requests())


def fleet_totals(workers: Sequence[WorkerView], prior_tokens_per_s: float) -> tuple[float, int]:
    """(summed speed, summed outstanding tokens) of the accepting workers, for :class:`Head`."""
    live = [w for w in workers if w.accepting]
    return sum(w.speed(prior_tokens_per_s) for w in live), sum(w.outstanding_tokens for w in live)
