"""Fault injection against a real stack: kill -9 workers and balancers at random moments.

    python -m bench.chaos [--kills 60] [--requests 3000] [--edges]

With ``--edges`` the loop also makes Redis full for moments (``maxmemory``, every write refused) and plants
garbage in gpulb's keys (a string at the wake-up list and at a worker's load key, a foreign ingress member whose
index Lua would write as a float, ingress counters at the edge of int64 or not numbers); then no process may stop
on its own, besides being answered exactly once.

Every process is a real ``gpulb`` CLI process on a private redis-server. A chaos loop kills a
random worker or balancer with SIGKILL, brings some back at once under the same id and leaves
others dead past their heartbeat TTL (so the balancer must reap them), until the kill count is
reached; then every request must be answered exactly once. Also measures how long a dead
worker's requests take to go back to the ingress (the heartbeat TTL plus at most one balancer
round).
"""

from __future__ import annotations

import argparse
import platform
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis

from gpulb import keys
from gpulb.cli.redis_server import RedisServer
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client

MODEL = "chaos-model"
LOAD_TTL_S = 1.5
FAST_FAILURE_ENV = {
    "GPULB_WORKER__LOAD_TTL_S": str(LOAD_TTL_S),
    "GPULB_WORKER__HEARTBEAT_S": "0.3",
    "GPULB_BALANCER__IDLE_WAKE_S": "0.2",
    "GPULB_BALANCER__BATCH_TARGET_S": "0.2",
    "GPULB_MAX_ATTEMPTS": "1000",  # chaos kills innocents: no request should be dead-lettered for it
}


@dataclass
class ChaosReport:
    requests: int
    kills: int = 0
    worker_kills: int = 0
    balancer_kills: int = 0
    lost: int = 0
    recorded_twice: int = 0
    failed: int = 0
    max_attempts_seen: int = 0
    seconds: float = 0.0
    recovery_s: list[float] = field(default_factory=list)
    full_spells: int = 0  # times Redis was made full (maxmemory) for a moment
    garbage_planted: int = 0
    unexpected_exits: int = 0  # processes that stopped without being killed


def fleet() -> list[WorkerSpec]:
    return [WorkerSpec(f"w{i}", MODEL, speed, max_batch=16) for i, speed in enumerate((3000, 3000, 6000))]


def run_chaos(
    redis_url: str, log_dir: Path, *, kills: int, requests: int, seed: int = 1, edges: bool = False
) -> ChaosReport:
    """Kill loop; with ``edges``, also spells of a full Redis and garbage planted in gpulb's keys."""
    rng = random.Random(seed)
    report = ChaosReport(requests=requests)
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    with LocalStack(redis_url, fleet(), log_dir, balancers=2, env=FAST_FAILURE_ENV) as stack, Client(redis_url) as c:
        started = time.monotonic()
        batch = c.submit_batch([{"prompt": f"r{i}", "max_tokens": rng.randint(10, 50)} for i in range(requests)],
                               model=MODEL)  # fmt: skip
        down: dict[str, float] = {}
        while report.kills < kills or down:
            _note_exits(stack, down, report)
            _revive(stack, down, rng)
            if report.kills < kills:
                _kill_one(stack, down, rng, report)
                if edges:
                    _edge_fault(conn, rng, report)
            time.sleep(rng.uniform(0.1, 0.4))  # chaos cadence
        _note_exits(stack, down, report)
        results = batch.results(timeout=300)
        report.seconds = time.monotonic() - started
        status = batch.status()
    report.lost = requests - len({r.index for r in results})
    report.recorded_twice = status.completed + status.failed - requests
    report.failed = status.failed
    report.max_attempts_seen = max(r.attempts for r in results)
    conn.close()
    return report


def _note_exits(stack: LocalStack, down: dict[str, float], report: ChaosReport) -> None:
    for name, proc in stack.procs.items():
        if proc.poll() is not None and name not in down:
            report.unexpected_exits += 1
            down[name] = time.monotonic()  # brought back like a killed one


GARBAGE = (
    lambda c: c.set(keys.wakeup_key(), "not a list"),
    lambda c: (c.sadd(keys.workers_key(), "intruder"), c.set(keys.load_key("intruder"), "not a hash")),
    lambda c: c.zadd(keys.ingress_key(MODEL), {"abababababababab:123456789012345:0::5": -1}),
    lambda c: c.set(keys.ingress_tokens_key(MODEL), "9223372036854775807"),
    lambda c: c.set(keys.ingress_requests_key(MODEL), "lots"),
)


def _edge_fault(conn: redis.Redis, rng: random.Random, report: ChaosReport) -> None:
    """One time in four: Redis full for 0.3-1.5 s (every write refused), or one piece of garbage planted."""
    roll = rng.random()
    if roll < 0.125:
        conn.config_set("maxmemory", 1)
        try:
            time.sleep(rng.uniform(0.3, 1.5))
        finally:
            conn.config_set("maxmemory", 0)
        report.full_spells += 1
    elif roll < 0.25:
        rng.choice(GARBAGE)(conn)
        report.garbage_planted += 1


def _kill_one(stack: LocalStack, down: dict[str, float], rng: random.Random, report: ChaosReport) -> None:
    alive = [n for n, p in stack.procs.items() if p.poll() is None and n not in down]
    workers = [n for n in alive if n in stack.workers]
    balancers = [n for n in alive if n not in stack.workers]
    candidates = (workers if len(workers) > 1 else []) + (balancers if len(balancers) > 1 else [])
    if not candidates:
        return
    victim = rng.choice(candidates)
    stack.procs[victim].send_signal(signal.SIGKILL)
    stack.procs[victim].wait()
    report.kills += 1
    if victim in stack.workers:
        report.worker_kills += 1
    else:
        report.balancer_kills += 1
    # half come back at once (same id: takes over its own work), half stay dead past the TTL (reaped)
    down[victim] = time.monotonic() + (0.0 if rng.random() < 0.5 else LOAD_TTL_S + rng.uniform(0.5, 1.5))


def _revive(stack: LocalStack, down: dict[str, float], rng: random.Random) -> None:
    for name, when in list(down.items()):
        if time.monotonic() >= when:
            stack.restart(name)
            del down[name]


def measure_recovery(redis_url: str, log_dir: Path, repeats: int = 3) -> list[float]:
    """Seconds from SIGKILL of a worker holding work until its requests are back in the ingress."""
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    times: list[float] = []
    spec = [WorkerSpec("victim", MODEL, 100, max_batch=4), WorkerSpec("survivor", MODEL, 100, max_batch=4)]
    with LocalStack(redis_url, spec, log_dir, env=FAST_FAILURE_ENV) as stack, Client(redis_url) as client:
        for _ in range(repeats):
            client.submit_batch([{"prompt": "x", "max_tokens": 100}] * 40, model=MODEL)
            while not conn.scard(keys.inflight_key("victim")):
                time.sleep(0.01)
            killed = time.monotonic()
            stack.procs["victim"].send_signal(signal.SIGKILL)
            stack.procs["victim"].wait()
            while conn.scard(keys.inflight_key("victim")):
                time.sleep(0.01)
            times.append(time.monotonic() - killed)
            stack.restart("victim")
            stack.wait_registered(["victim"], 30)
    conn.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--edges", action="store_true", help="also make Redis full for moments and plant garbage")
    args = parser.parse_args()
    print(f"# gpulb chaos run, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}; heartbeat TTL {LOAD_TTL_S} s")
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        r = run_chaos(server.url, Path(tmp) / "chaos", kills=args.kills, requests=args.requests, seed=args.seed,
                      edges=args.edges)  # fmt: skip
        recovery = measure_recovery(server.url, Path(tmp) / "recovery")
    print("| kills (workers + balancers) | full-Redis spells | garbage planted | requests | lost | recorded twice | "
          "failed | max attempts | exits not killed | time (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r.kills} ({r.worker_kills} + {r.balancer_kills}) | {r.full_spells} | {r.garbage_planted} | {r.requests} | "
        f"{r.lost} | {r.recorded_twice} | {r.failed} | {r.max_attempts_seen} | {r.unexpected_exits} | {r.seconds:.1f} |"
    )
    print(
        f"\ndead worker -> its requests back in the ingress: median {statistics.median(recovery):.2f} s, "
        f"max {max(recovery):.2f} s over {len(recovery)} kills (TTL {LOAD_TTL_S} s)"
    )


if __name__ == "__main__":
    main()
