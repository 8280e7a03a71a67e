"""The pipeline benchmark (issue 2): a heavy-tailed batch on four linear simulated GPUs of mixed speed.

(``bench.fleet`` is its successor on continuous-batching engines, the default since issue 13.)

    python -m bench.pipeline [--requests 1000] [--speeds 1000,1000,2000,4000] [--repeat 1]

Starts a private redis-server, a balancer and one worker per speed as real ``gpulb`` processes,
submits the batch from Python and reports the makespan against the fluid bound (total tokens /
total speed: no schedule can beat it) and against what round-robin would take on the same batch.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from bench.workloads import fluid_bound_s, heavy_tailed_requests, round_robin_makespan_s
from gpulb.cli.redis_server import RedisServer
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client

MODEL = "bench-model"


def run_once(redis_url: str, speeds: list[float], n_requests: int, seed: int, log_dir: Path) -> dict[str, object]:
    workers = [WorkerSpec(id=f"gpu{i}-{int(s)}tps", model=MODEL, tokens_per_s=s, backend="simulated-linear")
               for i, s in enumerate(speeds)]  # fmt: skip
    requests = heavy_tailed_requests(n_requests, seed=seed)
    max_tokens = [int(r["max_tokens"]) for r in requests]  # type: ignore[call-overload]
    with LocalStack(redis_url, workers, log_dir), Client(redis_url) as client:
        start = time.time()
        batch = client.submit_batch(requests, model=MODEL)
        results = batch.results(timeout=600)
        makespan = max(r.finished_at for r in results) - start
    assert [r.index for r in results] == list(range(n_requests)), "results out of order or missing"
    assert all(r.error is None and r.output_tokens == m for r, m in zip(results, max_tokens, strict=True))
    tokens_by_worker: Counter[str] = Counter()
    for r in results:
        tokens_by_worker[r.worker] += r.output_tokens
    total = sum(max_tokens)
    fluid = fluid_bound_s(total, speeds)
    return {
        "total_tokens": total,
        "fluid_s": fluid,
        "makespan_s": makespan,
        "ratio": makespan / fluid,
        "round_robin_ratio": round_robin_makespan_s(max_tokens, speeds) / fluid,
        "shares": {w.id: tokens_by_worker[w.id] / total for w in workers},
        "speed_shares": {w.id: w.tokens_per_s / sum(speeds) for w in workers},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--speeds", default="1000,1000,2000,4000", help="tokens/s of each simulated worker")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    speeds = [float(s) for s in args.speeds.split(",")]
    print(
        f"# gpulb pipeline benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"# {args.requests} lognormal requests on workers at {args.speeds} tokens/s\n")
    print("| run | total tokens | fluid bound (s) | makespan (s) | makespan / fluid | round-robin / fluid |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        for run in range(args.repeat):
            out = run_once(server.url, speeds, args.requests, args.seed + run, Path(tmp) / f"logs{run}")
            print(
                f"| {run + 1} | {out['total_tokens']} | {out['fluid_s']:.2f} | {out['makespan_s']:.2f} | "
                f"{out['ratio']:.3f} | {out['round_robin_ratio']:.3f} |"
            )
            shares = ", ".join(f"{w} {s:.1%}" for w, s in out["shares"].items())  # type: ignore[attr-defined]
            print(f"#   token shares: {shares}")


if __name__ == "__main__":
    main()
