"""Seeded workloads shared by the benchmarks and the end-to-end tests."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def heavy_tailed_requests(
    n: int, *, seed: int = 7, mu: float = 3.6, sigma: float = 1.0, cap: int = 2048
) -> list[dict[str, object]]:
    """``n`` requests whose ``max_tokens`` are lognormal (median e**mu), capped at ``cap``."""
    rng = random.Random(seed)
    return [
        {"prompt": f"request {i} says hello", "max_tokens": max(1, min(cap, round(rng.lognormvariate(mu, sigma))))}
        for i in range(n)
    ]


def fluid_bound_s(total_tokens: int, speeds: Sequence[float]) -> float:
    """No schedule can finish sooner: all work spread over all speeds, with nothing idle."""
    return total_tokens / sum(speeds)


def round_robin_makespan_s(max_tokens: Sequence[int], speeds: Sequence[float]) -> float:
    """The makespan if request i went to worker i mod N, each worker running its share back to back."""
    loads = [0] * len(speeds)
    for i, tokens in enumerate(max_tokens):
        loads[i % len(speeds)] += tokens
    return max(load / speed for load, speed in zip(loads, speeds, strict=True))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
