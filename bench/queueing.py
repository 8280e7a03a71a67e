"""Queueing-theory yardsticks for the open-loop scenario (pure maths)."""

from __future__ import annotations

import math


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in M/M/c (offered load a = lambda / mu, a < c)."""
    if offered_load >= servers:
        return 1.0
    head = sum(offered_load**k / math.factorial(k) for k in range(servers))
    tail = offered_load**servers / math.factorial(servers) * servers / (servers - offered_load)
    return tail / (head + tail)


def mmc_wait(servers: int, arrival_rate: float, service_rate: float) -> tuple[float, float]:
    """(mean, p99) waiting time in M/M/c FIFO: the best any FIFO dispatcher over c servers can do."""
    c_prob = erlang_c(servers, arrival_rate / service_rate)
    drain = servers * service_rate - arrival_rate
    p99 = math.log(c_prob / 0.01) / drain if c_prob > 0.01 else 0.0
    return c_prob / drain, p99


def random_split_wait(servers: int, arrival_rate: float, service_rate: float) -> tuple[float, float]:
    """(mean, p99) waiting time when each arrival picks a server at random: c independent M/M/1."""
    per_server = arrival_rate / servers
    rho = per_server / service_rate
    drain = service_rate - per_server
    p99 = math.log(rho / 0.01) / drain if rho > 0.01 else 0.0
    return rho / drain, p99
