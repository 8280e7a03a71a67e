"""Keeping continuous-batching engines full (issue 13), measured with real processes, side by side in one run.

    python -m bench.fleet [--requests 2000] [--speeds 1,1,2,4] [--base-tokens-per-s 4000] [--repeat 1]

Four simulated GPUs that batch continuously (``--backend simulated``: 128 slots each, a decode step that
costs ``fixed + per_seq * running``, outputs that stop at their own EOS, median 124 and mean ~173 tokens
under ``max_tokens=512``), fed the same requests two ways:

* **jsq** (the peer to beat): the same engines in this process, fed by a plain client that sends each
  request to the engine with the fewest in flight, never more than its slots (join-shortest-queue
  capped at the slot count, as online routers do), with no Redis and no queue in between;
* **gpulb**: a private redis-server, ``gpulb balancer`` and one ``gpulb worker --backend simulated`` per
  engine as real processes, every setting at its default, the batch submitted with ``Client.submit_batch``.

Reported: the makespan against the fluid bound (all generated tokens over the engines' summed speed at
their slot limit: no schedule beats it), gpulb's makespan over jsq's, and the slots busy on average
until the backlog ran out (from each request's start and end, capped at each engine's slots).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpulb.cli.occupancy import Span as BusySpan
from gpulb.cli.occupancy import busy_share
from gpulb.cli.redis_server import RedisServer
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client
from worker.backends.base import BackendOutput, BackendRequest
from worker.backends.batching import DEFAULT_SLOTS
from worker.backends.simulated import SimulatedBackend

MODEL = "bench-fleet"
MAX_TOKENS = 512
TARGET_VS_JSQ = 1.0
TARGET_FLUID = 1.3
TARGET_OCCUPANCY = 0.85


@dataclass(frozen=True, slots=True)
class Span:
    engine: str
    started_at: float
    finished_at: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    makespan_s: float
    fluid_s: float
    occupancy: float
    tokens: int
    shares: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.fluid_s


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["gpu", "batch", "token", "engine", "slot", "queue", "model", "prompt", "answer", "fleet", "cache"]
    return [f"request {i}: " + " ".join(rng.choices(words, k=rng.randint(8, 200))) for i in range(count)]


def occupancy(spans: list[Span], slots: dict[str, int], start: float) -> float:
    """Mean share of all slots busy from ``start`` until the last request started (the backlog ran out)."""
    end = max(s.started_at for s in spans)
    return busy_share((occupancy_span(s) for s in spans), slots, start, end)


def occupancy_span(span: Span) -> BusySpan:
    return BusySpan(span.engine, span.started_at, span.finished_at)


def summary(name: str, spans: list[Span], start: float, speeds: dict[str, float], slots: dict[str, int]) -> Run:
    tokens = sum(s.tokens for s in spans)
    by_engine = {e: sum(s.tokens for s in spans if s.engine == e) / tokens for e in speeds}
    return Run(name, max(s.finished_at for s in spans) - start, tokens / sum(speeds.values()),
               occupancy(spans, slots, start), tokens, by_engine)  # fmt: skip


class JsqClient:
    """Each request to the engine with the fewest in flight, capped at its slots; the next one as a slot frees."""

    def __init__(self, engines: dict[str, SimulatedBackend]) -> None:
        self.engines = engines
        self.in_flight = dict.fromkeys(engines, 0)
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.backlog: deque[str] = deque()
        self.left = 0

    def run(self, texts: list[str]) -> list[Span]:
        self.backlog, self.left = deque(texts), len(texts)
        self._feed()
        self.done.wait()
        return self.spans

    def _feed(self) -> None:
        with self.lock:
            while self.backlog:
                free = [e for e, n in self.in_flight.items() if n < self.engines[e].slots()]
                if not free:
                    return
                engine = min(free, key=lambda e: self.in_flight[e])
                self.in_flight[engine] += 1
                text, started = self.backlog.popleft(), time.time()
                future = self.engines[engine].submit(BackendRequest(text, MAX_TOKENS))
                future.add_done_callback(lambda f, e=engine, t=started: self._finished(e, t, f))  # type: ignore[misc]

    def _finished(self, engine: str, started: float, future: Future[BackendOutput]) -> None:
        span = Span(engine, started, time.time(), future.result().output_tokens)
        with self.lock:
            self.in_flight[engine] -= 1
            self.spans.append(span)
            self.left -= 1
            if not self.left:
                self.done.set()
        threading.Thread(target=self._feed, daemon=True).start()  # not on the engine's thread


def run_jsq(texts: list[str], speeds: dict[str, float]) -> Run:
    engines = {name: SimulatedBackend(speed) for name, speed in speeds.items()}
    try:
        start = time.time()
        spans = JsqClient(engines).run(texts)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return summary("jsq", spans, start, speeds, {e: DEFAULT_SLOTS for e in speeds})


def run_gpulb(redis_url: str, texts: list[str], speeds: dict[str, float], log_dir: Path) -> Run:
    workers = [WorkerSpec(name, MODEL, speed) for name, speed in speeds.items()]
    with LocalStack(redis_url, workers, log_dir), Client(redis_url) as client:
        start = time.time()
        results = client.submit_batch(texts, model=MODEL, max_tokens=MAX_TOKENS).results(timeout=900)
    assert [r.index for r in results] == list(range(len(texts))), "results missing or out of order"
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    spans = [Span(r.worker, r.started_at, r.finished_at, r.output_tokens) for r in results]
    return summary("gpulb", spans, start, speeds, {e: DEFAULT_SLOTS for e in speeds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--speeds", default="1,1,2,4", help="relative engine speeds")
    parser.add_argument("--base-tokens-per-s", type=float, default=4000.0, help="speed 1 at its slot limit")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    speeds = {f"gpu{i}-x{s}": float(s) * args.base_tokens_per_s for i, s in enumerate(args.speeds.split(","))}
    print(f"# gpulb fleet benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    print(f"# {args.requests} EOS-terminated requests (max_tokens {MAX_TOKENS}) on continuous-batching engines at "
          f"{', '.join(f'{s:.0f}' for s in speeds.values())} tok/s, {DEFAULT_SLOTS} slots each\n")  # fmt: skip
    print("| run | fluid (s) | jsq (s) | jsq / fluid | gpulb (s) | gpulb / fluid | gpulb / jsq | slots busy jsq | "
          "slots busy gpulb |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    figures = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        for run in range(args.repeat):
            texts = prompts(args.requests, args.seed + run)
            jsq = run_jsq(texts, speeds)
            gpulb = run_gpulb(server.url, texts, speeds, Path(tmp) / f"logs{run}")
            server_conn_flush(server.url)
            print(f"| {run + 1} | {gpulb.fluid_s:.2f} | {jsq.makespan_s:.2f} | {jsq.ratio:.3f} | "
                  f"{gpulb.makespan_s:.2f} | **{gpulb.ratio:.3f}** | **{gpulb.makespan_s / jsq.makespan_s:.3f}** | "
                  f"{jsq.occupancy:.1%} | **{gpulb.occupancy:.1%}** |", flush=True)  # fmt: skip
            shares = ", ".join(f"{e} {s:.1%}" for e, s in gpulb.shares.items())
            print(f"#   gpulb token shares: {shares}")
            figures.append({"jsq": asdict(jsq), "gpulb": asdict(gpulb)})
    print(f"\n# targets: gpulb / jsq <= {TARGET_VS_JSQ}, gpulb / fluid <= {TARGET_FLUID}, "
          f"slots busy >= {TARGET_OCCUPANCY:.0%} until the backlog runs out")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def server_conn_flush(url: str) -> None:
    """A fresh Redis for the next run: nothing learned, nothing left."""
    import redis

    redis.Redis.from_url(url).flushall()


if __name__ == "__main__":
    main()
