"""``gpulb up`` and ``gpulb demo``: a complete stack on this machine with one command.

``up`` uses the Redis at the configured URL, or starts a private ``redis-server`` there when
nothing answers on a local address (its AOF kept in a data directory for the next ``up``); then a
balancer and N workers (simulated by default, at mixed speeds). Every child runs in a session of its
own, so that Ctrl-C reaches only ``up``, which stops them in order: workers and balancer drain, then
Redis. A worker or balancer that dies meanwhile is started again. ``demo`` does the same on a
throw-away Redis directory, submits a sample batch and shows how the work was shared.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import redis

from gpulb.cli.occupancy import Span, busy_share, busy_shares
from gpulb.cli.redis_server import RedisServer
from gpulb.cli.stack import WORKER_ID_IN_USE_EXIT, LocalStack, WorkerSpec
from gpulb.cli.status import read_fleet_status
from gpulb.connection import connect, redact_url
from gpulb.errors import BadPayload, ConfigError
from gpulb.models import WorkerLoad
from gpulb.records import load_from_reply, queue_load_reads
from gpulb.settings import Settings

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}
DEFAULT_SPEEDS = "4000,4000,8000,16000"  # tokens/s of each simulated engine with all its slots busy
STOP_TIMEOUT_S = 60.0
REDIS_STOP_FLOOR_S = 5.0  # Redis gets this long to write its AOF out, even past the deadline
DATA_DIR_TEXT = "$XDG_STATE_HOME/gpulb/redis/PORT (default ~/.local/state/gpulb/redis/PORT)"


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    up = sub.add_parser(
        "up",
        help="start a complete local stack: Redis (if none answers), a balancer and workers; Ctrl-C stops it",
        description="Start Redis (a private redis-server when nothing answers at a local --redis-url), a balancer "
        "and N workers, and keep them running until Ctrl-C. Simulated workers by default, at --speeds. "
        "It refuses to start (exit 1) when a balancer, or a worker with one of its ids, already runs on that Redis. "
        "Ctrl-C or SIGTERM stops it in order, within --stop-timeout seconds: the workers and the balancer drain "
        "(queued work goes back to Redis), then the private Redis; a second Ctrl-C kills what still runs. "
        "Exit status: 0 when every process stopped by itself, 1 when one had to be killed.",
        epilog="Then, in another terminal: gpulb submit FILE.jsonl -o OUT.jsonl    gpulb status --watch",
        parents=parents,
    )
    up.add_argument("--data-dir", type=Path,
                    help=f"where a private redis-server keeps its data (AOF), reused by the next gpulb up "
                         f"(default {DATA_DIR_TEXT})")  # fmt: skip
    up.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_S,
                    help=f"seconds to stop everything after Ctrl-C (default {STOP_TIMEOUT_S:g})")  # fmt: skip
    demo = sub.add_parser(
        "demo",
        help="start a local stack, run a sample batch on a fleet of mixed speeds, show each GPU's share",
        description="Run `gpulb up`, submit a heavy-tailed sample batch with a progress bar, then print each "
        "worker's share of the work next to its share of the fleet's speed, and stop the stack. A private Redis "
        "started for the demo keeps its data in a throw-away directory, removed at the end.",
        parents=parents,
    )
    for parser in (up, demo):
        parser.add_argument("--model", default="demo", help="model the workers serve (default demo)")
        parser.add_argument(
            "--speeds", default=DEFAULT_SPEEDS, help=f"simulated tokens/s per worker ({DEFAULT_SPEEDS})"
        )
        parser.add_argument("--workers", type=int, help="worker count (default: one per --speeds entry)")
        parser.add_argument("--backend", default="simulated", help="backend of every worker (default simulated)")
        parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                            help="extra worker option, repeatable: --worker-arg=--model-path=/models/x")  # fmt: skip
        parser.add_argument("--policy", help="balancer policy (default least-time)")
    demo.add_argument("--requests", type=int, default=2000, help="sample batch size (default 2000)")


@dataclass(frozen=True, slots=True)
class FleetPlan:
    model: str
    workers: list[WorkerSpec]
    policy: str | None


def plan_from_args(args: argparse.Namespace) -> FleetPlan:
    try:
        speeds = [float(s) for s in args.speeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--speeds {args.speeds!r}: expected numbers like 1000,2000") from None
    count = args.workers or len(speeds)
    if count < 1 or not speeds or any(s <= 0 for s in speeds):
        raise ConfigError("need at least one worker and positive --speeds")
    workers = [WorkerSpec(f"gpu{i}", args.model, speeds[i % len(speeds)], backend=args.backend,
                          args=tuple(args.worker_arg)) for i in range(count)]  # fmt: skip
    return FleetPlan(args.model, workers, args.policy)


def _redis_answers(settings: Settings) -> bool:
    """True if a Redis answers; an error other than "nobody there" (a wrong password) is raised as it is."""
    try:
        connect(settings, retries=0).ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if isinstance(exc, redis.AuthenticationError):
            raise ConfigError(f"Redis at {redact_url(settings.redis_url)} refused our password: {exc}") from exc
        return False
    except redis.RedisError as exc:
        raise ConfigError(f"something answers at {redact_url(settings.redis_url)}, but not as Redis: {exc}") from exc
    return True


def default_data_dir(port: int) -> Path:
    """Where ``gpulb up``'s private Redis keeps its data: one directory a port, under the XDG state home."""
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "gpulb" / "redis" / str(port)


class Shutdown:
    """SIGINT/SIGTERM: the first one interrupts (KeyboardInterrupt) and the stack stops in order under one deadline;
    another one forces the stop: what still runs is killed."""

    def __init__(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.forced = threading.Event()
        self.deadline: float | None = None
        self.killed: list[str] = []
        self._interrupted = False

    def install(self) -> Shutdown:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._interrupted and self.deadline is None:
            self._interrupted = True
            raise KeyboardInterrupt
        self.forced.set()
        os.write(sys.stderr.fileno(), b"gpulb: forced: killing what still runs\n")  # safe inside a handler

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s

    def left_s(self) -> float:
        return self.timeout_s if self.deadline is None else max(0.0, self.deadline - time.monotonic())


@contextmanager
def ensure_redis(settings: Settings, data_dir: Path | None, shutdown: Shutdown) -> Iterator[RedisServer | None]:
    """Yield None if Redis answers at the configured URL; else start a private one there (local URLs only), its data
    in ``data_dir`` (None: a throw-away directory)."""
    if _redis_answers(settings):
        yield None
        return
    parts = urlsplit(settings.redis_url)
    if parts.hostname not in LOCAL_HOSTS:
        raise ConfigError(f"no Redis answers at {redact_url(settings.redis_url)}, and it is not local: start it there")
    with tempfile.TemporaryDirectory(prefix="gpulb-redis-") as throw_away:
        workdir = data_dir or Path(throw_away)
        server = RedisServer(workdir, appendonly=True, port=parts.port or 6379)
        kept = "removed at the end" if data_dir is None else "kept for the next gpulb up (--data-dir to change)"
        print(f"gpulb: no Redis at {redact_url(settings.redis_url)}; started a private redis-server, its data (AOF) "
              f"in {workdir}, {kept}", file=sys.stderr)  # fmt: skip
        server.start()
        try:
            yield server
        finally:
            shutdown.begin()
            server.stop(timeout_s=max(REDIS_STOP_FLOOR_S, shutdown.left_s()))


@contextmanager
def local_stack(
    settings: Settings, plan: FleetPlan, shutdown: Shutdown, data_dir: Path | None = None
) -> Iterator[LocalStack]:
    env = {"GPULB_BALANCER__POLICY": plan.policy} if plan.policy else {}
    with ensure_redis(settings, data_dir, shutdown) as server:
        if server is None:
            refuse_if_a_stack_runs(settings, [w.id for w in plan.workers])
        url = server.url if server else settings.redis_url
        logs = Path(tempfile.mkdtemp(prefix="gpulb-up-"))
        print(f"gpulb: starting a balancer and {len(plan.workers)} {plan.workers[0].backend} workers; logs in {logs}",
              file=sys.stderr)  # fmt: skip
        stack = LocalStack(url, plan.workers, logs, env=env)
        try:
            yield stack.start(timeout_s=120)
        finally:
            print("gpulb: stopping: workers and the balancer drain, then Redis (Ctrl-C again to force)",
                  file=sys.stderr, flush=True)  # fmt: skip
            shutdown.begin()
            codes = stack.stop(timeout_s=shutdown.left_s(), force=shutdown.forced)
            shutdown.killed = [name for name, code in codes.items() if code is None]


def refuse_if_a_stack_runs(settings: Settings, worker_ids: list[str]) -> None:
    """A ConfigError naming what runs when a live balancer, or a live worker with one of these ids, uses Redis."""
    conn = connect(settings, retries=0)
    try:
        fleet = read_fleet_status(conn)
    finally:
        conn.close()
    taken = [w for w in fleet.workers if w.worker_id in worker_ids and w.state not in ("gone", "malformed")]
    if fleet.balancer is None and not taken:
        return
    parts = [] if fleet.balancer is None else [f"a balancer (pid {fleet.balancer.pid} on {fleet.balancer.host})"]
    if taken:
        parts.append("workers " + ", ".join(f"{w.worker_id} ({w.model})" for w in taken))
    url = urlsplit(settings.redis_url)
    other = f"redis://{url.hostname or 'localhost'}:{(url.port or 6379) + 1}/0"
    raise ConfigError(f"a gpulb stack already runs on the Redis at {redact_url(settings.redis_url)}: "
                      f"{' and '.join(parts)}. Use it as it is (gpulb submit, gpulb status), stop it first, or "
                      f"start this one on another Redis: gpulb --redis-url {other} up")  # fmt: skip


def run_up(args: argparse.Namespace, settings: Settings) -> int:
    plan = plan_from_args(args)
    shutdown = Shutdown(args.stop_timeout).install()
    data_dir = args.data_dir or default_data_dir(urlsplit(settings.redis_url).port or 6379)
    try:
        with local_stack(settings, plan, shutdown, data_dir) as stack:
            print(f"gpulb: up. Redis {redact_url(stack.redis_url)}, model {plan.model!r}, workers "
                  + ", ".join(f"{w.id} ({w.tokens_per_s:g} tok/s)" for w in plan.workers)
                  + f"\n  try:  gpulb --redis-url {redact_url(stack.redis_url)} status --watch"
                  + "\n  stop: Ctrl-C", file=sys.stderr, flush=True)  # fmt: skip
            keep_running(stack)
    except KeyboardInterrupt:
        pass
    if shutdown.killed:
        print(f"gpulb: stopped; killed {', '.join(shutdown.killed)}", file=sys.stderr)
        return 1
    print("gpulb: stopped", file=sys.stderr)
    return 0


def keep_running(stack: LocalStack) -> None:
    """Start again what exits, until interrupted; a worker whose id a live worker holds is left stopped."""
    given_up: set[str] = set()
    while True:
        time.sleep(1.0)  # a period, not a synchronisation: children are looked at once a second
        _restart_dead(stack, given_up)


def _restart_dead(stack: LocalStack, given_up: set[str]) -> None:
    for name, proc in list(stack.procs.items()):
        if name in given_up or proc.poll() is None:
            continue
        if proc.returncode == WORKER_ID_IN_USE_EXIT:
            print(f"gpulb: {name} exited: a live worker elsewhere holds the id {name!r} (another stack on this "
                  "Redis?); not starting it again", file=sys.stderr)  # fmt: skip
            given_up.add(name)
            continue
        print(f"gpulb: {name} exited with {proc.returncode}; starting it again", file=sys.stderr)
        stack.restart(name)


def sample_requests(count: int, *, seed: int = 7) -> list[dict[str, Any]]:
    """A chat-like mix: answers stop at their own end (the engine decides), under varied max_tokens."""
    rng = random.Random(seed)
    topics = ["GPUs", "queues", "Redis", "batching", "KV caches", "tail latency", "schedulers", "prefill"]
    return [{"prompt": f"Explain {rng.choice(topics)} to a new engineer, part {i}.",
             "max_tokens": max(16, min(512, round(rng.lognormvariate(5.0, 0.6))))} for i in range(count)]  # fmt: skip


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from gpulb.cli.batch import follow
    from gpulb.cli.progress import ProgressReporter
    from producer import Client

    plan = plan_from_args(args)
    requests = sample_requests(args.requests)
    shutdown = Shutdown().install()
    with local_stack(settings, plan, shutdown) as stack, Client(stack.redis_url) as client:
        print(f"gpulb: submitting {len(requests):,} requests to {len(plan.workers)} workers", file=sys.stderr)
        started = time.time()
        batch = client.submit_batch(requests, model=plan.model)
        follow(batch, ProgressReporter(), timeout=None)
        results = batch.results(timeout=60)
        slots = worker_slots(stack.redis_url, [w.id for w in plan.workers])
    print(share_table(plan, results, started, slots))
    return 0


def worker_slots(redis_url: str, worker_ids: list[str]) -> dict[str, int]:
    """Each worker's engine slots, from its load key (0: a static-batch engine)."""
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        pipe = conn.pipeline(transaction=False)
        queue_load_reads(pipe, worker_ids)
        loads = [_load_or_none(reply) for reply in pipe.execute()]
    finally:
        conn.close()
    return {w: load.slots if load else 0 for w, load in zip(worker_ids, loads, strict=True)}


def _load_or_none(reply: Mapping[str, str] | redis.ResponseError) -> WorkerLoad | None:
    """A worker's load for the demo's closing table; None if it is gone or holds garbage (the table shows 0)."""
    try:
        return load_from_reply(reply)
    except BadPayload:
        return None


def share_table(plan: FleetPlan, results: list[Any], started: float, slots: dict[str, int]) -> str:
    """Each worker's share of the tokens served next to its share of the fleet's speed, and how full its engine
    was kept until the backlog ran out."""
    tokens, counts = Counter[str](), Counter[str]()
    for r in results:
        tokens[r.worker] += r.output_tokens
        counts[r.worker] += 1
    backlog_out = max(r.started_at for r in results)
    spans = [Span(r.worker, r.started_at, r.finished_at) for r in results]
    continuous = {w: n for w, n in slots.items() if n > 0}
    busy = busy_shares(spans, continuous, started, backlog_out)
    total_tokens, total_speed = sum(tokens.values()), sum(w.tokens_per_s for w in plan.workers)
    lines = [f"{'WORKER':<8} {'TOK/S':>7} {'SPEED SHARE':>12} {'REQUESTS':>9} {'TOKENS':>9} {'WORK SHARE':>11} "
             f"{'SLOTS BUSY':>11}"]  # fmt: skip
    for w in plan.workers:
        full = f"{busy[w.id]:.0%} of {slots[w.id]}" if w.id in busy else "-"
        lines.append(f"{w.id:<8} {w.tokens_per_s:>7g} {w.tokens_per_s / total_speed:>12.1%} {counts[w.id]:>9,} "
                     f"{tokens[w.id]:>9,} {tokens[w.id] / max(1, total_tokens):>11.1%} {full:>11}")  # fmt: skip
    makespan_s = max(r.finished_at for r in results) - started
    bound = max(total_tokens / total_speed, 1e-9)
    failed = sum(1 for r in results if not r.ok)
    lines.append(f"\n{len(results):,} requests ({failed} failed), {total_tokens:,} tokens in {makespan_s:.2f} s. "
                 f"The fluid bound (engines full to the end): {bound:.2f} s, so {makespan_s / bound:.2f}x")  # fmt: skip
    if continuous:
        overall = busy_share(spans, continuous, started, backlog_out)
        lines.append(f"Engines kept {overall:.0%} of their slots busy until the backlog ran out "
                     f"({backlog_out - started:.2f} s).")  # fmt: skip
    return "\n".join(lines)
