"""Balancing quality, live: every policy side by side, plus plain RQ as a shared queue.

    python -m bench.balance [--scenarios batch,open,prefix,scale] [--out bench/results]

1. batch:  4 workers at 1000/1000/2000/4000 tok/s, lognormal max_tokens: makespan / fluid bound.
2. open:   Poisson arrivals at 80% load on 4 equal one-at-a-time workers, exponential sizes: mean
           and p99 wait against Erlang-C (M/M/4, the best FIFO can do) and random split.
3. prefix: interleaved groups sharing long prompt prefixes: affinity hit rate and makespan.
4. scale:  the balancer's cost per dispatched request with 10, 100 and 1,000 workers.
Writes a markdown table and a PNG per scenario under --out.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from balancer.dispatcher import Balancer
from bench import rq_baseline
from bench.queueing import mmc_wait, random_split_wait
from bench.workloads import fluid_bound_s, heavy_tailed_requests, percentile
from gpulb import keys
from gpulb.cli.redis_server import RedisServer
from gpulb.cli.stack import LocalStack, WorkerSpec
from gpulb.models import PREFIX_AFFINITY_BYTES, Result, WorkerLoad, WorkerState
from gpulb.settings import Settings
from producer import Client

MODEL = "bench"
SPEEDS = (1000.0, 1000.0, 2000.0, 4000.0)
POLICIES = ("round-robin", "random", "least-loaded", "power-of-two", "least-time", "prefix-affinity")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


LINEAR = "simulated-linear"


def fresh(url: str) -> None:
    redis.Redis.from_url(url).flushall()


def fleet(speeds: tuple[float, ...] = SPEEDS, max_batch: int = 64) -> list[WorkerSpec]:
    """The linear servers of the first design (a micro-batch takes its tokens over the speed); bench.fleet has
    the continuous-batching engines."""
    return [WorkerSpec(f"gpu{i}", MODEL, s, max_batch, backend=LINEAR) for i, s in enumerate(speeds)]


def run_batch(url: str, log_dir: Path, policy: str, requests: list[dict[str, object]],
              env: dict[str, str] | None = None) -> tuple[float, list[Result]]:  # fmt: skip
    fresh(url)
    stack_env = {"GPULB_BALANCER__POLICY": policy, **(env or {})}
    with LocalStack(url, fleet(), log_dir / policy, env=stack_env), Client(url) as client:
        start = time.time()
        results = client.submit_batch(requests, model=MODEL).results(timeout=900)
    assert len(results) == len(requests) and all(r.error is None for r in results)
    return max(r.finished_at for r in results) - start, results


def run_rq_shared(url: str, log_dir: Path, requests: list[dict[str, object]]) -> float:
    """Plain RQ: one SimpleWorker per speed on one shared queue, one job per request."""
    fresh(url)
    stack = LocalStack(url, [], log_dir / "rq", balancers=0)
    for i, speed in enumerate(SPEEDS):
        stack.procs[f"rq{i}"] = _spawn_rq_worker(url, speed, log_dir)
    conn = redis.Redis.from_url(url)
    try:
        time.sleep(1.0)  # let the RQ workers start listening
        start = time.time()
        ids = rq_baseline.enqueue(conn, "shared", requests)
        jobs = _wait_rq(conn, ids)
        return max(j.ended_at.timestamp() for j in jobs if j.ended_at) - start
    finally:
        stack.stop()


def _spawn_rq_worker(url: str, speed: float, log_dir: Path) -> subprocess.Popen[bytes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"rq-{speed}.log").open("ab")
    cmd = [sys.executable, "-m", "bench.rq_baseline", "worker", "--url", url, "--queue", "shared",
           "--tokens-per-s", str(speed)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log, stderr=log)


def _wait_rq(conn: redis.Redis, ids: list[str]) -> list[Job]:
    while True:
        jobs = [j for j in Job.fetch_many(ids, connection=conn, serializer=JSONSerializer) if j is not None]
        if all(j.get_status(refresh=False) == "finished" for j in jobs):
            return jobs
        time.sleep(0.2)  # polling RQ's job status: the baseline has no completion events


def scenario_batch(url: str, tmp: Path, n: int) -> Table:
    requests = heavy_tailed_requests(n, seed=21)
    fluid = fluid_bound_s(sum(int(r["max_tokens"]) for r in requests), SPEEDS)  # type: ignore[call-overload]
    rows = []
    for policy in POLICIES:
        makespan, results = run_batch(url, tmp, policy, requests)
        share: defaultdict[str, int] = defaultdict(int)
        for r in results:
            share[r.worker] += r.output_tokens
        total = sum(share.values())
        shares = "/".join(f"{share[f'gpu{i}'] / total:.0%}" for i in range(len(SPEEDS)))
        rows.append([policy, f"{makespan:.2f}", f"**{makespan / fluid:.3f}**", shares])
    rq = run_rq_shared(url, tmp, requests)
    rows.append(["plain RQ, shared queue (1 job/request)", f"{rq:.2f}", f"**{rq / fluid:.3f}**", "-"])
    return Table(
        f"Batch: {n} lognormal requests on 1000/1000/2000/4000 tok/s (fluid bound {fluid:.2f} s)",
        ["policy", "makespan (s)", "makespan / fluid", "token shares (12.5/12.5/25/50% ideal)"],
        rows,
    )


def scenario_open(url: str, tmp: Path, n: int) -> Table:
    servers, speed, mean_tokens, load = 4, 500.0, 100, 0.8
    mu = speed / mean_tokens
    lam = load * servers * mu
    theory_mean, theory_p99 = mmc_wait(servers, lam, mu)
    split_mean, split_p99 = random_split_wait(servers, lam, mu)
    rows = [["Erlang-C M/M/4 (theory)", f"{theory_mean * 1000:.0f}", f"{theory_p99 * 1000:.0f}", "1.00"],
            ["random split (theory)", f"{split_mean * 1000:.0f}", f"{split_p99 * 1000:.0f}",
             f"{split_mean / theory_mean:.2f}"]]  # fmt: skip
    for policy in ("least-time", "random"):
        waits = open_loop(url, tmp, policy, n, lam, mean_tokens, speed)
        mean = statistics.fmean(waits)
        rows.append([f"{policy} (live)", f"{mean * 1000:.0f}", f"{percentile(waits, 0.99) * 1000:.0f}",
                     f"**{mean / theory_mean:.2f}**"])  # fmt: skip
    return Table(f"Open loop: Poisson arrivals at {load:.0%} load, 4 workers one request at a time, "
                 f"exponential service (mean {1000 / mu:.0f} ms), {n} requests",
                 ["dispatcher", "mean wait (ms)", "p99 wait (ms)", "mean / Erlang-C"], rows)  # fmt: skip


def open_loop(url: str, tmp: Path, policy: str, n: int, lam: float, mean_tokens: int, speed: float) -> list[float]:
    fresh(url)
    rng = random.Random(5)
    env = {"GPULB_BALANCER__POLICY": policy, "GPULB_BALANCER__MAX_OUTSTANDING_BATCHES": "1",
           "GPULB_BALANCER__PRIOR_TOKENS_PER_S": str(speed)}  # fmt: skip
    workers = [WorkerSpec(f"gpu{i}", MODEL, speed, max_batch=1, backend=LINEAR) for i in range(4)]
    with LocalStack(url, workers, tmp / f"open-{policy}", env=env), Client(url) as client:
        handles = []
        next_at = time.monotonic()
        for _ in range(n):
            next_at += rng.expovariate(lam)
            if (delay := next_at - time.monotonic()) > 0:
                time.sleep(delay)  # open loop: arrivals follow the clock, not the system
            size = max(1, round(rng.expovariate(1 / mean_tokens)))
            handles.append(client.submit("x", model=MODEL, max_tokens=size))
        results = [h.result(timeout=300) for h in handles]
    return [r.started_at - r.submitted_at for r in results]


def prefix_workload(groups: int, per_group: int, seed: int = 9) -> list[dict[str, object]]:
    rng = random.Random(seed)
    requests = []
    for g in range(groups):
        prefix = (f"document {g} " * 40)[: PREFIX_AFFINITY_BYTES + 44]
        for q in range(per_group):
            requests.append(
                {"prompt": f"{prefix} question {q}", "max_tokens": max(1, round(rng.lognormvariate(3.4, 0.8)))}
            )
    rng.shuffle(requests)  # sessions interleave, as they do in real traffic
    return requests


def hit_rate(results: list[Result], requests: list[dict[str, object]]) -> float:
    """A hit: the worker had already started a request of the same prefix group (a warm prefix cache)."""
    seen: dict[str, set[str]] = defaultdict(set)
    hits = 0
    for r in sorted(results, key=lambda r: (r.started_at, r.index)):
        group = str(requests[r.index]["prompt"])[:PREFIX_AFFINITY_BYTES]
        hits += group in seen[r.worker]
        seen[r.worker].add(group)
    return hits / len(results)


def scenario_prefix(url: str, tmp: Path, groups: int) -> Table:
    requests = prefix_workload(groups, 5)
    fluid = fluid_bound_s(sum(int(r["max_tokens"]) for r in requests), SPEEDS)  # type: ignore[call-overload]
    rows = []
    for policy in ("least-time", "prefix-affinity"):
        makespan, results = run_batch(url, tmp, policy, requests)
        rows.append([policy, f"**{hit_rate(results, requests):.1%}**", f"{makespan:.2f}", f"{makespan / fluid:.3f}"])
    return Table(f"Shared prefixes: {groups} groups x 5 requests sharing a {PREFIX_AFFINITY_BYTES + 44}-byte prefix, "
                 "interleaved, on 1000/1000/2000/4000 tok/s", ["policy", "prefix hit rate", "makespan (s)",
                 "makespan / fluid"], rows)  # fmt: skip


def scenario_scale(url: str, sizes: tuple[int, ...] = (10, 100, 1000), rounds: int = 600, repeats: int = 3) -> Table:
    rows, base = [], 0.0
    for n in sizes:
        # the median of a few runs: one run on a shared 2-core machine is noisy
        per_request = statistics.median(decision_cost(url, n, rounds) for _ in range(repeats))
        base = base or per_request
        rows.append([str(n), f"{per_request * 1e6:.0f}", f"**{per_request / base:.2f}**"])
    return Table("Scale: balancer cost per dispatched request (snapshot refresh + decision + dispatch script), "
                 f"median of {repeats} runs",
                 ["workers", "us per request", "vs 10 workers"], rows)  # fmt: skip


def decision_cost(url: str, workers: int, rounds: int, completions_per_round: int = 5) -> float:
    """Steady state: each round some workers finish a micro-batch and the balancer refills them."""
    fresh(url)
    conn = redis.Redis.from_url(url, decode_responses=True)
    rng = random.Random(3)
    _fake_fleet(conn, workers, rng)
    with Client(url) as client:
        client.submit_batch([{"prompt": "p", "max_tokens": 8}] * (rounds * completions_per_round * 8 + workers * 20),
                            model=MODEL)  # fmt: skip
    settings = Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
    balancer = Balancer(conn, redis.Redis.from_url(url), settings, rng=random.Random(1))
    balancer.dispatch_round()  # fill every worker's credit
    elapsed, placed = 0.0, 0
    ids = [f"fake{i}" for i in range(workers)]
    for _ in range(rounds):
        for worker_id in rng.sample(ids, min(completions_per_round, workers)):
            _fake_completion(conn, worker_id)
        started = time.perf_counter()
        placed += balancer.dispatch_round()
        elapsed += time.perf_counter() - started
    return elapsed / placed


def _fake_fleet(conn: redis.Redis, n: int, rng: random.Random) -> None:
    pipe = conn.pipeline(transaction=False)
    for i in range(n):
        load = WorkerLoad(worker_id=f"fake{i}", model=MODEL, backend="fake", state=WorkerState.IDLE, capacity=8,
                          tokens_per_s=rng.uniform(500, 4000))  # fmt: skip
        pipe.hset(keys.load_key(f"fake{i}"), mapping=load.to_hash())  # type: ignore[arg-type]
        pipe.sadd(keys.workers_key(), f"fake{i}")
    pipe.execute()


def _fake_completion(conn: redis.Redis, worker_id: str) -> None:
    """What the record script does to credit when a worker finishes its oldest micro-batch."""
    inflight: set[str] = conn.smembers(keys.inflight_key(worker_id))  # type: ignore[assignment]
    mb = next(iter(inflight), None)
    if mb is None:
        return
    tokens, count = conn.hmget(keys.microbatch_key(mb), ["tokens", "count"])
    pipe = conn.pipeline(transaction=False)
    pipe.delete(keys.microbatch_key(mb), keys.rq_job_key(mb))
    pipe.lrem(keys.rq_queue_key(worker_id), 0, mb)
    pipe.srem(keys.inflight_key(worker_id), mb)
    pipe.hincrby(keys.credit_key(worker_id), "batches", -1)
    pipe.hincrby(keys.credit_key(worker_id), "tokens", -int(tokens or 0))
    pipe.hincrby(keys.credit_key(worker_id), "requests", -int(count or 0))
    pipe.rpush(keys.wakeup_key(), keys.wake_worker_token(worker_id))
    pipe.execute()


def plot(table: Table, column: int, path: Path, ylabel: str, reference: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r[0] for r in table.rows]
    values = [float(r[column].strip("*").rstrip("%")) for r in table.rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(labels, values, color="#4c72b0")
    if reference is not None:
        ax.axvline(reference, color="#c44e52", linestyle="--", label=f"target {reference}")
        ax.legend()
    ax.set_xlabel(ylabel)
    ax.set_title(table.title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="batch,open,prefix,scale")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--open-requests", type=int, default=800)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.scenarios.split(",")
    stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} ({platform.machine()}, 2 cores)"
    tables: list[str] = [f"# gpulb balancing benchmark, {stamp}"]
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        url, work = server.url, Path(tmp)
        runs: dict[str, tuple[Callable[[], Table], int, str, float | None]] = {
            "batch": (lambda: scenario_batch(url, work, args.requests), 2, "makespan / fluid bound", 1.10),
            "open": (lambda: scenario_open(url, work, args.open_requests), 3, "mean wait / Erlang-C", 1.25),
            "prefix": (lambda: scenario_prefix(url, work, args.requests // 5), 1, "prefix hit rate %", None),
            "scale": (lambda: scenario_scale(url), 2, "cost per request vs 10 workers", 2.0),
        }
        for name in wanted:
            build, column, label, target = runs[name]
            table = build()
            print(table.markdown(), "\n", flush=True)
            tables.append(table.markdown())
            plot(table, column, args.out / f"{name}.png", label, target)
    (args.out / "balance.md").write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
