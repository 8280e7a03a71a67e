"""A worker's Prometheus metrics: its load, its engine's, and each request's latency and outcome."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gpulb.metrics import LATENCY_BUCKETS
from gpulb.models import Result, WorkerLoad

LOAD_GAUGES = {  # load-key field -> (metric name, help); -1 (unknown) is not exported
    "running": ("gpulb_worker_running", "Requests running on this worker"),
    "queued": ("gpulb_worker_queued_microbatches", "Micro-batches in this worker's RQ queue"),
    "tokens_per_s": (
        "gpulb_worker_tokens_per_second",
        "Measured speed: tokens/s a full engine generates (continuous), cost tokens/s (static)",
    ),
    "engine_running": ("gpulb_engine_running", "Requests the engine reports running"),
    "engine_waiting": ("gpulb_engine_waiting", "Requests the engine reports waiting"),
    "kv_cache_usage": ("gpulb_engine_kv_cache_usage", "KV-cache usage reported by the engine, 0-1"),
    "gpu_util": ("gpulb_gpu_utilization_percent", "GPU utilisation from NVML"),
    "gpu_mem_used_mb": ("gpulb_gpu_memory_used_mb", "GPU memory used, from NVML"),
}


class WorkerMetrics:
    def __init__(self, worker_id: str, model: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = (worker_id, model)
        names = ["worker", "model"]
        self.gauges = {field: Gauge(name, text, names, registry=self.registry).labels(*self.labels)
                       for field, (name, text) in LOAD_GAUGES.items()}  # fmt: skip
        self.outcomes = Counter("gpulb_requests", "Requests finished here, by outcome", [*names, "outcome"],
                                registry=self.registry)  # fmt: skip
        self.retries = Counter("gpulb_request_retries", "Extra tries of requests (busy engine, failures)", names,
                               registry=self.registry).labels(*self.labels)  # fmt: skip
        self.microbatches = Counter("gpulb_microbatches", "Micro-batches run", names,
                                    registry=self.registry).labels(*self.labels)  # fmt: skip
        self.queue_wait = Histogram("gpulb_request_queue_wait_seconds", "Submit to start on this worker", names,
                                    buckets=LATENCY_BUCKETS, registry=self.registry).labels(*self.labels)  # fmt: skip
        self.service = Histogram("gpulb_request_service_seconds", "Start to finish on this worker", names,
                                 buckets=LATENCY_BUCKETS, registry=self.registry).labels(*self.labels)  # fmt: skip

    def observe_load(self, load: WorkerLoad) -> None:
        for field, gauge in self.gauges.items():
            value = float(getattr(load, field))
            if value >= 0:
                gauge.set(value)

    def observe_results(self, results: Iterable[Result], attempts_before: Iterable[int]) -> None:
        self.microbatches.inc()
        for result, before in zip(results, attempts_before, strict=True):
            outcome = "cancelled" if result.cancelled else "failed" if result.error else "completed"
            self.outcomes.labels(*self.labels, outcome).inc()
            if result.cancelled:
                continue
            self.retries.inc(max(0, result.attempts - before - 1))
            self.queue_wait.observe(max(0.0, result.started_at - result.submitted_at))
            self.service.observe(max(0.0, result.finished_at - result.started_at))
