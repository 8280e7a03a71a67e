"""The placement policies, as pure functions of a load snapshot, and how they distribute work."""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from balancer.policy import (
    SAMPLE_SIZE,
    UNBOUNDED,
    Context,
    Head,
    Policy,
    PolicyName,
    WorkerView,
    batch_budget,
    fleet_totals,
    least_time_worker,
    make_policy,
)  # fmt: skip
from bench.workloads import fluid_bound_s, heavy_tailed_requests, round_robin_makespan_s

PRIOR = 1000.0


def view(worker_id: str, speed: float, *, batches: int = 0, tokens: int = 0, requests: int = 0,
         accepting: bool = True) -> WorkerView:  # fmt: skip
    return WorkerView(worker_id, "m", capacity=64, tokens_per_s=speed, outstanding_batches=batches,
                      outstanding_tokens=tokens, accepting=accepting, outstanding_requests=requests)  # fmt: skip


def ctx(seed: int = 0, **kw: object) -> Context:
    return Context(rng=random.Random(seed), prior_tokens_per_s=PRIOR, **kw)  # type: ignore[arg-type]


def head(cost: int, backlog: int = 10**6, workers: list[WorkerView] | None = None, affinity: str = "") -> Head:
    speed, outstanding = fleet_totals(workers or [], PRIOR)
    return Head(cost, backlog, affinity, "", speed, outstanding)


def choose(workers: list[WorkerView], cost: int, seed: int = 0) -> WorkerView | None:
    return least_time_worker(workers, head(cost, workers=workers), ctx(seed))


class TestLeastTime:
    def test_picks_the_worker_that_finishes_first(self) -> None:
        slow, fast = view("slow", 1000), view("fast", 4000, batches=1, tokens=2000)
        assert choose([slow, fast], 100) is slow  # 0.1 s against (2000 + 100) / 4000 = 0.525 s
        assert choose([slow, fast], 3000) is fast  # 3.0 s against 1.25 s

    def test_waits_rather_than_commit_to_a_slower_worker(self) -> None:
        assert choose([view("fast", 4000, batches=2, tokens=400), view("slow", 1000)], 2000) is None

    def test_unmeasured_worker_uses_the_prior(self) -> None:
        new, measured = view("new", 0), view("measured", 500)
        assert choose([new, measured], 100) is new

    def test_ignores_workers_not_accepting(self) -> None:
        draining, ok = view("draining", 8000, accepting=False), view("ok", 100)
        assert choose([draining, ok], 10) is ok
        assert choose([draining], 10) is None

    def test_ties_are_broken_randomly_not_by_list_order(self) -> None:
        workers = [view(f"w{i}", 1000) for i in range(4)]
        picks = Counter(choose(workers, 50, seed).worker_id for seed in range(400))  # type: ignore[union-attr]
        assert set(picks) == {"w0", "w1", "w2", "w3"} and min(picks.values()) > 60

    def test_a_large_fleet_is_sampled_not_scanned(self, monkeypatch: pytest.MonkeyPatch) -> None:
        workers = [view(f"w{i}", 1000 + i) for i in range(1000)]
        calls = 0
        original = WorkerView.finish_time

        def counting(self: WorkerView, extra: int, prior: float) -> float:
            nonlocal calls
            calls += 1
            return original(self, extra, prior)

        monkeypatch.setattr(WorkerView, "finish_time", counting)
        assert choose(workers, 10) is not None
        assert calls <= SAMPLE_SIZE


class TestBatchBudget:
    def test_deep_backlog_gives_target_seconds_of_work(self) -> None:
        fast, slow = view("fast", 4000), view("slow", 1000)
        assert batch_budget(fast, [fast, slow], head(10, 10**6, [fast, slow]), ctx()) == 2000

    def test_short_backlog_shrinks_to_the_water_filling_share(self) -> None:
        fast, slow = view("fast", 4000), view("slow", 1000)
        # 1000 tokens left over 5000 tok/s: everyone should finish at 0.2 s -> fast gets 800, slow 200
        assert batch_budget(fast, [fast, slow], head(10, 1000, [fast, slow]), ctx()) == 800
        assert batch_budget(slow, [fast, slow], head(10, 1000, [fast, slow]), ctx()) == 200

    def test_never_below_the_head_request(self) -> None:
        slow = view("slow", 1000, tokens=5000)
        assert batch_budget(slow, [slow], head(700, 10, [slow]), ctx()) == 700


class TestBaselines:
    def test_round_robin_cycles_in_id_order_whatever_the_speed(self) -> None:
        policy, c = make_policy("round-robin"), ctx()
        workers = [view("b", 9000), view("a", 10), view("c", 10)]
        picks = [policy.choose(workers, head(5), c).worker.worker_id for _ in range(6)]  # type: ignore[union-attr]
        assert picks == ["b", "c", "a", "b", "c", "a"]

    def test_least_loaded_counts_requests_not_speed(self) -> None:
        workers = [view("fast", 9000, requests=5), view("slow", 10, requests=1)]
        choice = make_policy("least-loaded").choose(workers, head(5), ctx())
        assert choice is not None and choice.worker.worker_id == "slow"

    def test_power_of_two_takes_the_less_loaded_of_two(self) -> None:
        workers = [view("busy", 1000, requests=9), view("idle", 1000, requests=0)]
        picks = {make_policy("power-of-two").choose(workers, head(5), ctx(s)).worker.worker_id  # type: ignore[union-attr]
                 for s in range(20)}  # fmt: skip
        assert picks == {"idle"}

    def test_baselines_bind_early_and_least_time_late(self) -> None:
        late = {name: make_policy(name).late_binding for name in PolicyName}
        assert late == {
            PolicyName.ROUND_ROBIN: False, PolicyName.RANDOM: False, PolicyName.LEAST_LOADED: False,
            PolicyName.POWER_OF_TWO: False, PolicyName.LEAST_TIME: True, PolicyName.PREFIX_AFFINITY: True,
        }  # fmt: skip


class TestPrefixAffinity:
    def owned(self, cost: int, owner: str) -> Head:
        return Head(cost, 10**6, "k1", owner)

    def test_an_owned_key_goes_back_to_its_owner(self) -> None:
        a, b = view("a", 1000, tokens=300, batches=1), view("b", 1000)
        choice = make_policy("prefix-affinity").choose([a, b], self.owned(10, "a"), ctx())
        assert choice is not None and choice.worker is a  # a little behind: affinity still wins
        assert choice.respect_affinity and choice.free_owners == ()

    def test_yields_when_the_owner_is_far_behind(self) -> None:
        a, b = view("a", 1000, tokens=5000, batches=1), view("b", 1000)
        c = ctx(affinity_abs_s=1.0, affinity_rel=1.5)
        choice = make_policy("prefix-affinity").choose([a, b], self.owned(10, "a"), c)
        assert choice is not None and choice.worker is b and choice.free_owners == ("a",)

    def test_a_gone_owner_frees_its_keys(self) -> None:
        b = view("b", 1000)
        choice = make_policy("prefix-affinity").choose([b], self.owned(10, "vanished"), ctx())
        assert choice is not None and choice.worker is b and choice.free_owners == ("vanished",)

    def test_a_busy_owner_leaves_the_others_to_take_unowned_work(self) -> None:
        a, b = view("a", 1000, tokens=300, batches=2), view("b", 1000)  # full, but only 0.3 s behind
        choice = make_policy("prefix-affinity").choose([a, b], self.owned(10, "a"), ctx())
        assert choice is not None and choice.worker is b and choice.free_owners == ()

    def test_every_laggard_is_freed_not_only_the_heads_owner(self) -> None:
        a, lag, b = view("a", 1000, tokens=100), view("lag", 1000, tokens=9000, batches=1), view("b", 1000)
        choice = make_policy("prefix-affinity").choose([a, lag, b], self.owned(10, "a"), ctx())
        assert choice is not None and choice.worker is a and choice.free_owners == ("lag",)

    def test_without_a_key_it_is_least_time(self) -> None:
        slow, fast = view("slow", 100), view("fast", 4000)
        choice = make_policy("prefix-affinity").choose([slow, fast], head(400), ctx())
        assert choice is not None and choice.worker is fast and choice.free_owners == ()


@dataclass(order=True)
class _Done:
    at: float
    worker: str = field(compare=False)
    tokens: int = field(compare=False)
    count: int = field(compare=False)


def simulate(policy: Policy, speeds: dict[str, float], costs: list[int], *, capacity: int = 64) -> float:
    """Discrete-event run of the balancer's decisions over workers that serve micro-batches in order."""
    c = ctx(1, max_outstanding=2 if policy.late_binding else UNBOUNDED)
    views = {w: view(w, 0) for w in speeds}
    backlog, now, events = deque(costs), 0.0, []  # type: list[_Done]
    free_at = dict.fromkeys(speeds, 0.0)

    def dispatch() -> None:
        while backlog:
            choice = policy.choose(list(views.values()), head(backlog[0], sum(backlog), list(views.values())), c)
            if choice is None:
                return
            tokens, count = backlog.popleft(), 1
            while backlog and count < capacity and tokens + backlog[0] <= choice.token_budget:
                tokens, count = tokens + backlog.popleft(), count + 1
            v = choice.worker
            v.outstanding_batches, v.outstanding_tokens = v.outstanding_batches + 1, v.outstanding_tokens + tokens
            v.outstanding_requests += count
            free_at[v.worker_id] = max(now, free_at[v.worker_id]) + tokens / speeds[v.worker_id]
            heapq.heappush(events, _Done(free_at[v.worker_id], v.worker_id, tokens, count))

    dispatch()
    while events:
        done = heapq.heappop(events)
        now = done.at
        v = views[done.worker]
        v.outstanding_batches, v.outstanding_tokens = v.outstanding_batches - 1, v.outstanding_tokens - done.tokens
        v.outstanding_requests -= done.count
        v.tokens_per_s = speeds[done.worker]  # the worker's measured EMA
        dispatch()
    return now


class TestScheduleQuality:
    SPEEDS: ClassVar[dict[str, float]] = {"a": 1000.0, "b": 1000.0, "c": 2000.0, "d": 4000.0}

    def ratio(self, name: str, costs: list[int]) -> float:
        return simulate(make_policy(name), self.SPEEDS, costs) / fluid_bound_s(sum(costs), list(self.SPEEDS.values()))

    def test_least_time_finishes_a_heavy_tailed_batch_near_the_fluid_bound(self) -> None:
        costs = [int(r["max_tokens"]) for r in heavy_tailed_requests(1000, seed=3)]  # type: ignore[call-overload]
        assert self.ratio("least-time", costs) <= 1.10
        assert round_robin_makespan_s(costs, list(self.SPEEDS.values())) >= 1.8 * fluid_bound_s(
            sum(costs), list(self.SPEEDS.values())
        )

    @pytest.mark.parametrize("name", ["round-robin", "least-loaded"])
    def test_speed_blind_baselines_take_about_twice_as_long(self, name: str) -> None:
        costs = [int(r["max_tokens"]) for r in heavy_tailed_requests(1000, seed=3)]  # type: ignore[call-overload]
        assert 1.7 <= self.ratio(name, costs) <= 3.0

    def test_one_huge_request_at_the_end_goes_to_the_fast_worker(self) -> None:
        costs = [50] * 400 + [4000]
        assert self.ratio("least-time", costs) <= 1.35  # on the slowest it alone would take 4 s = 1.67x


def engine(worker_id: str, speed: float, *, requests: int = 0, tokens: int = 0, slots: int = 128,
           queue: int = 32) -> WorkerView:  # fmt: skip
    return WorkerView(worker_id, "m", capacity=64, tokens_per_s=speed, outstanding_requests=requests,
                      outstanding_tokens=tokens, slots=slots, queue_slots=queue)  # fmt: skip


def slot_head(cost: int, backlog_requests: int, workers: list[WorkerView]) -> Head:
    speed, outstanding = fleet_totals(workers, PRIOR)
    return Head(cost, cost * backlog_requests, "", "", speed, outstanding, backlog_requests)


class TestContinuousEngines:
    """Credit in engine slots: keep every engine full while the backlog lasts, spare the slow ones in the tail."""

    def test_an_engine_with_free_slots_gets_work_while_the_backlog_is_deep(self) -> None:
        fast = engine("fast", 16000, requests=160, tokens=160 * 173)  # full: slots and queue
        slow = engine("slow", 4000, requests=100, tokens=100 * 173)
        picked = least_time_worker([fast, slow], slot_head(173, 2000, [fast, slow]), ctx())
        assert picked is slow  # the fast one would finish sooner, but it has no room: keep the slow one full

    def test_in_the_tail_a_slow_engine_is_passed_over(self) -> None:
        fast = engine("fast", 16000, requests=140, tokens=140 * 173)
        slow = engine("slow", 4000, requests=100, tokens=100 * 173)
        # its own 173 tokens at a full engine's per-sequence rate take 5.5 s; the fleet is done in ~1.9 s
        assert least_time_worker([fast, slow], slot_head(173, 40, [fast, slow]), ctx()) is fast
        fast.outstanding_requests = 160
        assert least_time_worker([fast, slow], slot_head(173, 40, [fast, slow]), ctx()) is None  # wait for it

    def test_an_unmeasured_engine_is_probed_not_starved(self) -> None:
        fast = engine("fast", 16000, requests=140, tokens=140 * 173)
        new = engine("new", 0)
        assert least_time_worker([fast, new], slot_head(173, 40, [fast, new]), ctx()) is new

    def test_a_micro_batch_fills_the_free_slots_up_to_the_batch_limit(self) -> None:
        half = engine("w", 4000, requests=140)
        choice = make_policy("least-time").choose([half], slot_head(100, 2000, [half]), ctx())
        assert choice is not None and choice.max_requests == 20
        empty = engine("w", 4000)
        choice = make_policy("least-time").choose([empty], slot_head(100, 2000, [empty]), ctx())
        assert choice is not None and choice.max_requests == 64

    def test_it_waits_for_room_worth_an_rq_job_unless_the_backlog_is_short(self) -> None:
        almost = engine("w", 4000, requests=157)  # 3 free: less than half its queue
        assert least_time_worker([almost], slot_head(100, 2000, [almost]), ctx()) is None
        assert least_time_worker([almost], slot_head(100, 2, [almost]), ctx()) is almost


class TestContinuousFleet:
    """The policy on a simulated fleet of continuous-batching engines (bench.fleetsim), against a router that
    sends each request to the engine with the fewest in flight, capped at its slots (join-shortest-queue)."""

    def test_it_beats_join_shortest_queue_near_the_fluid_bound_with_engines_kept_full(self) -> None:
        from bench.fleetsim import eos_requests, run_gpulb, run_jsq
        from worker.backends.batching import EngineShape

        shapes = [EngineShape(4000.0 * s) for s in (1, 1, 2, 4)]
        requests = eos_requests(2000, seed=0, expected=173)
        jsq, gpulb = run_jsq(requests, shapes), run_gpulb(requests, shapes)
        assert jsq.ratio > 1.4  # a long request on a slow engine in the tail
        assert gpulb.makespan_s <= 0.9 * jsq.makespan_s and gpulb.ratio <= 1.35
        assert gpulb.occupancy >= 0.85
