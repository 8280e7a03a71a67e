"""Discrete-event runs of a fleet of continuous-batching engines, in virtual time (no Redis, no processes).

The engines are :class:`worker.backends.batching.BatchingCore`, the model behind ``--backend simulated``.
Two ways of feeding them, on the same requests:

* ``gpulb``: the balancer's own policy (``balancer.policy``) places micro-batches on workers that hold
  ``slots + queue_slots`` requests and admit a queued micro-batch as soon as their engine has a free slot;
* ``jsq``: a plain client that sends each request to the engine with the fewest in flight, capped at its
  slot count (join-shortest-queue, as online routers do).

It is what the policy was designed on, and a unit test holds the policy to it; ``bench.fleet`` measures
the same thing with the real processes.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from balancer.policy import Context, Head, WorkerView, make_policy
from worker.backends.batching import BatchingCore, EngineShape, LengthModel


@dataclass(frozen=True, slots=True)
class SimRequest:
    index: int
    tokens: int  # what the engine will generate
    prompt_tokens: int
    cost: int  # what the balancer expects it to cost


@dataclass(frozen=True, slots=True)
class SimResult:
    makespan_s: float
    fluid_s: float
    occupancy: float  # mean share of slots running while the backlog lasted
    generated: int
    microbatches: int = 0

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.fluid_s


def eos_requests(count: int, *, max_tokens: int = 512, seed: int = 0, expected: int | None = None) -> list[SimRequest]:
    """Requests whose outputs stop at their own end (the simulated engine's length model)."""
    rng, lengths = random.Random(seed), LengthModel()
    out = []
    for i in range(count):
        words = rng.randint(8, 200)
        tokens = min(max_tokens, lengths.natural_length(f"request {i} seed {seed}"))
        out.append(SimRequest(i, tokens, words, (expected or tokens) + words // 8))
    return out


def fluid_bound_s(requests: list[SimRequest], shapes: list[EngineShape]) -> float:
    return sum(r.tokens for r in requests) / sum(s.tokens_per_s for s in shapes)


@dataclass(slots=True)
class _Engine:
    shape: EngineShape
    core: BatchingCore = field(init=False)
    queue: deque[list[SimRequest]] = field(default_factory=deque)
    view: WorkerView | None = None

    def __post_init__(self) -> None:
        self.core = BatchingCore(self.shape)


class _Fleet:
    def __init__(self, shapes: list[EngineShape]) -> None:
        self.engines = [_Engine(s) for s in shapes]
        self.now = 0.0
        self.busy_slot_s = 0.0
        self.backlog_ended_at: float | None = None

    def step(self) -> list[tuple[_Engine, SimRequest]]:
        """Advance to the next finish anywhere; returns what finished there."""
        times = [t for e in self.engines if (t := e.core.next_event_s()) is not None]
        if not times:
            return []
        until = min(times)
        if self.backlog_ended_at is None:
            self.busy_slot_s += (until - self.now) * sum(len(e.core.running) for e in self.engines)
        self.now = until
        return [(e, key) for e in self.engines for key in e.core.advance(until)]

    def occupancy(self) -> float:
        end = self.backlog_ended_at if self.backlog_ended_at is not None else self.now
        slots = sum(e.shape.slots for e in self.engines)
        return self.busy_slot_s / (end * slots) if end > 0 else 0.0


def run_jsq(requests: list[SimRequest], shapes: list[EngineShape], seed: int = 0) -> SimResult:
    """Each request to the engine with the fewest in flight, never more than its slots."""
    fleet, backlog, rng = _Fleet(shapes), deque(requests), random.Random(seed)

    def feed() -> None:
        while backlog:
            free = [e for e in fleet.engines if e.core.in_flight < e.shape.slots]
            if not free:
                return
            fewest = min(e.core.in_flight for e in free)
            engine = rng.choice([e for e in free if e.core.in_flight == fewest])
            r = backlog.popleft()
            engine.core.submit(r, r.prompt_tokens, r.tokens, fleet.now)
        if fleet.backlog_ended_at is None:
            fleet.backlog_ended_at = fleet.now

    feed()
    while fleet.step() or any(e.core.in_flight for e in fleet.engines):
        feed()
    return SimResult(fleet.now, fluid_bound_s(requests, shapes), fleet.occupancy(), sum(r.tokens for r in requests))


def run_gpulb(
    requests: list[SimRequest], shapes: list[EngineShape], *, queue_slots: int | None = None, max_batch: int = 64,
    policy: str = "least-time", seed: int = 0,
) -> SimResult:  # fmt: skip
    """The balancer's policy over workers that hold ``slots + queue_slots`` requests each."""
    fleet, backlog = _Fleet(shapes), deque(requests)
    ctx = Context(rng=random.Random(seed), prior_tokens_per_s=1000.0)
    for i, e in enumerate(fleet.engines):
        queue = queue_slots if queue_slots is not None else max(1, e.shape.slots // 4)
        e.view = WorkerView(f"w{i}", "m", max_batch, e.shape.tokens_per_s, slots=e.shape.slots, queue_slots=queue)
    views = [e.view for e in fleet.engines if e.view is not None]
    microbatches = 0

    def admit(engine: _Engine) -> None:
        while engine.queue and engine.core.in_flight < engine.shape.slots:
            for r in engine.queue.popleft():
                engine.core.submit(r, r.prompt_tokens, r.tokens, fleet.now)

    def dispatch() -> None:
        nonlocal microbatches
        while backlog:
            head = Head(
                backlog[0].cost, sum(r.cost for r in backlog), fleet_tokens_per_s=sum(v.tokens_per_s for v in views),
                fleet_outstanding_tokens=sum(v.outstanding_tokens for v in views), backlog_requests=len(backlog),
            )  # fmt: skip
            choice = make_policy(policy).choose(views, head, ctx)
            if choice is None:
                return
            batch = [backlog.popleft()]
            limit = choice.max_requests or choice.worker.capacity
            tokens = batch[0].cost
            while backlog and len(batch) < limit and tokens + backlog[0].cost <= choice.token_budget:
                tokens += backlog[0].cost
                batch.append(backlog.popleft())
            engine = fleet.engines[views.index(choice.worker)]
            choice.worker.outstanding_requests += len(batch)
            choice.worker.outstanding_tokens += sum(r.cost for r in batch)
            choice.worker.outstanding_batches += 1
            engine.queue.append(batch)
            microbatches += 1
            admit(engine)
        if fleet.backlog_ended_at is None:
            fleet.backlog_ended_at = fleet.now

    dispatch()
    while True:
        finished = fleet.step()
        if not finished and not any(e.core.in_flight or e.queue for e in fleet.engines):
            break
        for engine, r in finished:
            assert engine.view is not None
            engine.view.outstanding_requests -= 1
            engine.view.outstanding_tokens -= r.cost
            admit(engine)
        dispatch()
    return SimResult(fleet.now, fluid_bound_s(requests, shapes), fleet.occupancy(), sum(r.tokens for r in requests),
                     microbatches)  # fmt: skip


def main() -> None:
    speeds = [1, 1, 2, 4]
    shapes = [EngineShape(4000.0 * s) for s in speeds]
    for seed in range(3):
        requests = eos_requests(2000, seed=seed, expected=173)
        jsq, gpulb = run_jsq(requests, shapes, seed), run_gpulb(requests, shapes, seed=seed)
        print(f"seed {seed}: fluid {jsq.fluid_s:.2f}s  jsq {jsq.ratio:.3f} (occ {jsq.occupancy:.2f})  "
              f"gpulb {gpulb.ratio:.3f} (occ {gpulb.occupancy:.2f}, {gpulb.microbatches} mb)  "
              f"gpulb/jsq {gpulb.makespan_s / jsq.makespan_s:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
