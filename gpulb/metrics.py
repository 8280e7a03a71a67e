"""Serving Prometheus metrics (``--metrics-port``). Each role defines its own ``gpulb_*`` metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from gpulb.errors import ConfigError
from gpulb.logs import get_logger

log = get_logger("gpulb.metrics")
# Seconds: from sub-millisecond balancer decisions to hour-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                   600, 1800, 3600)  # fmt: skip


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
    """Expose ``registry`` at ``http://host:port/metrics`` from a daemon thread."""
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port}: cannot listen ({exc.strerror})") from exc
    log.info("serving prometheus metrics", port=port, path="/metrics")
