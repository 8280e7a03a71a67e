"""The balancer's Prometheus metrics: what it placed where, how fast it decided, what waits."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpulb import keys
from gpulb.metrics import LATENCY_BUCKETS


class IngressCollector(Collector):
    """Read at scrape time: requests and cost tokens waiting in each model's ingress."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("gpulb_ingress_requests", "Requests waiting in the ingress", labels=["model"])
        tokens = GaugeMetricFamily("gpulb_ingress_tokens", "Cost tokens waiting in the ingress", labels=["model"])
        try:
            models: list[str] = sorted(self.conn.smembers(keys.models_key()))  # type: ignore[arg-type]
            pipe = self.conn.pipeline(transaction=False)
            for model in models:
                pipe.get(keys.ingress_requests_key(model))
                pipe.get(keys.ingress_tokens_key(model))
            replies = pipe.execute()
        except redis.RedisError:
            return  # Redis is away: no figures rather than a failed scrape
        for i, model in enumerate(models):
            depth.add_metric([model], float(replies[2 * i] or 0))
            tokens.add_metric([model], float(replies[2 * i + 1] or 0))
        yield depth
        yield tokens


class BalancerMetrics:
    def __init__(self, policy: str, conn: redis.Redis | None = None) -> None:
        self.registry = CollectorRegistry()
        self.policy = policy
        labels = ["worker", "model", "policy"]
        self.dispatches = Counter("gpulb_dispatches", "Micro-batches dispatched", labels, registry=self.registry)
        self.requests = Counter("gpulb_dispatched_requests", "Requests dispatched", labels, registry=self.registry)
        self.tokens = Counter("gpulb_dispatched_tokens", "Cost tokens dispatched", labels, registry=self.registry)
        self.decision = Histogram("gpulb_decision_seconds", "Choosing a worker and cutting its micro-batch",
                                  ["policy"], buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.reaped = Counter("gpulb_reaped_workers", "Workers found dead and reaped", registry=self.registry)
        self.recovered = Counter("gpulb_recovered_requests", "Requests taken back from dead workers",
                                 registry=self.registry)  # fmt: skip
        if conn is not None:
            self.registry.register(IngressCollector(conn))

    def dispatched(self, worker: str, model: str, requests: int, tokens: int) -> None:
        labels = (worker, model, self.policy)
        self.dispatches.labels(*labels).inc()
        self.requests.labels(*labels).inc(requests)
        self.tokens.labels(*labels).inc(tokens)
