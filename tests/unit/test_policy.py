"""The least-time policy and micro-batch sizing, as pure functions of a load snapshot."""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import ClassVar

from balancer.policy import WorkerView, batch_budget, choose_least_time
from bench.workloads import fluid_bound_s, heavy_tailed_requests, round_robin_makespan_s

PRIOR = 1000.0


def view(worker_id: str, speed: float, *, batches: int = 0, tokens: int = 0, accepting: bool = True) -> WorkerView:
    return WorkerView(worker_id, "m", capacity=64, tokens_per_s=speed, outstanding_batches=batches,
                      outstanding_tokens=tokens, accepting=accepting)  # fmt: skip


def choose(workers: list[WorkerView], head: int, seed: int = 0) -> WorkerView | None:
    return choose_least_time(workers, head, max_outstanding=2, prior_tokens_per_s=PRIOR, rng=random.Random(seed))


class TestChooseLeastTime:
    def test_picks_the_worker_that_finishes_first(self) -> None:
        slow, fast = view("slow", 1000), view("fast", 4000, batches=1, tokens=2000)
        # slow finishes 100 tokens at 0.1 s; fast at (2000 + 100) / 4000 = 0.525 s
        assert choose([slow, fast], 100) is slow
        # a 3000-token request: slow 3.0 s, fast 1.25 s
        assert choose([slow, fast], 3000) is fast

    def test_waits_rather_than_commit_to_a_slower_worker(self) -> None:
        fast_but_full = view("fast", 4000, batches=2, tokens=400)
        slow = view("slow", 1000)
        assert choose([fast_but_full, slow], 2000) is None  # fast would finish at 0.6 s, slow at 2 s

    def test_unmeasured_worker_uses_the_prior(self) -> None:
        new, measured = view("new", 0), view("measured", 500)
        assert choose([new, measured], 100) is new  # prior 1000 tok/s beats a measured 500

    def test_ignores_workers_not_accepting(self) -> None:
        draining = view("draining", 8000, accepting=False)
        ok = view("ok", 100)
        assert choose([draining, ok], 10) is ok
        assert choose([draining], 10) is None

    def test_ties_are_broken_randomly_not_by_list_order(self) -> None:
        workers = [view(f"w{i}", 1000) for i in range(4)]
        picks = Counter(choose(workers, 50, seed).worker_id for seed in range(400))  # type: ignore[union-attr]
        assert set(picks) == {"w0", "w1", "w2", "w3"}
        assert min(picks.values()) > 60


class TestBatchBudget:
    def test_deep_backlog_gives_target_seconds_of_work(self) -> None:
        fast = view("fast", 4000)
        budget = batch_budget(fast, [fast, view("slow", 1000)], backlog_tokens=10**6, head_cost=10,
                              batch_target_s=0.5, prior_tokens_per_s=PRIOR)  # fmt: skip
        assert budget == 2000

    def test_short_backlog_shrinks_to_the_water_filling_share(self) -> None:
        fast, slow = view("fast", 4000), view("slow", 1000)
        # 1000 tokens left over 5000 tok/s: everyone should finish at 0.2 s -> fast gets 800, slow 200
        common = {"backlog_tokens": 1000, "head_cost": 10, "batch_target_s": 0.5, "prior_tokens_per_s": PRIOR}
        assert batch_budget(fast, [fast, slow], **common) == 800  # type: ignore[arg-type]
        assert batch_budget(slow, [fast, slow], **common) == 200  # type: ignore[arg-type]

    def test_never_below_the_head_request(self) -> None:
        slow = view("slow", 1000, tokens=5000)
        budget = batch_budget(slow, [slow], backlog_tokens=10, head_cost=700, batch_target_s=0.5,
                              prior_tokens_per_s=PRIOR)  # fmt: skip
        assert budget == 700


@dataclass(order=True)
class _Done:
    at: float
    worker: str = field(compare=False)
    tokens: int = field(compare=False)


def simulate(speeds: dict[str, float], costs: list[int], *, capacity: int = 64, seed: int = 1) -> float:
    """Discrete-event run of the balancer's decisions over workers that serve micro-batches in order."""
    rng = random.Random(seed)
    views = {w: view(w, 0) for w in speeds}
    backlog, now, events = deque(costs), 0.0, []  # type: list[_Done]
    free_at = dict.fromkeys(speeds, 0.0)
    remaining = sum(costs)

    def dispatch() -> None:
        nonlocal remaining
        while backlog:
            chosen = choose_least_time(list(views.values()), backlog[0], max_outstanding=2,
                                       prior_tokens_per_s=PRIOR, rng=rng)  # fmt: skip
            if chosen is None:
                return
            budget = batch_budget(chosen, list(views.values()), backlog_tokens=remaining, head_cost=backlog[0],
                                  batch_target_s=0.5, prior_tokens_per_s=PRIOR)  # fmt: skip
            tokens, count = backlog.popleft(), 1
            while backlog and count < capacity and tokens + backlog[0] <= budget:
                tokens, count = tokens + backlog.popleft(), count + 1
            remaining -= tokens
            chosen.outstanding_batches += 1
            chosen.outstanding_tokens += tokens
            start = max(now, free_at[chosen.worker_id])
            free_at[chosen.worker_id] = start + tokens / speeds[chosen.worker_id]
            heapq.heappush(events, _Done(free_at[chosen.worker_id], chosen.worker_id, tokens))

    dispatch()
    while events:
        done = heapq.heappop(events)
        now = done.at
        v = views[done.worker]
        v.outstanding_batches -= 1
        v.outstanding_tokens -= done.tokens
        v.tokens_per_s = speeds[done.worker]  # the worker's measured EMA
        dispatch()
    return now


class TestScheduleQuality:
    SPEEDS: ClassVar[dict[str, float]] = {"a": 1000.0, "b": 1000.0, "c": 2000.0, "d": 4000.0}

    def test_heavy_tailed_batch_finishes_near_the_fluid_bound(self) -> None:
        costs = [int(r["max_tokens"]) for r in heavy_tailed_requests(1000, seed=3)]  # type: ignore[call-overload]
        fluid = fluid_bound_s(sum(costs), list(self.SPEEDS.values()))
        makespan = simulate(self.SPEEDS, costs)
        assert makespan <= 1.10 * fluid
        assert round_robin_makespan_s(costs, list(self.SPEEDS.values())) >= 1.8 * fluid

    def test_one_huge_request_at_the_end_goes_to_the_fast_worker(self) -> None:
        costs = [50] * 400 + [4000]
        fluid = fluid_bound_s(sum(costs), list(self.SPEEDS.values()))
        assert simulate(self.SPEEDS, costs) <= 1.35 * fluid  # on the slowest it alone would take 4 s = 1.67x
