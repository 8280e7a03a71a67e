"""Start the balancer process; SIGTERM/SIGINT stop it after the current round."""

from __future__ import annotations

import signal
from types import FrameType

from balancer.dispatcher import Balancer
from balancer.metrics import BalancerMetrics
from gpulb.connection import broker_errors, connect
from gpulb.metrics import serve_metrics
from gpulb.rq_books import check_rq
from gpulb.settings import Settings


def run_balancer(settings: Settings) -> None:
    check_rq()  # the dispatch script writes RQ's job hashes: fail now, not at the first dispatch, if RQ changed
    with broker_errors(settings.redis_url):
        conn = connect(settings)
        conn.ping()
        metrics = None
        if settings.metrics_port is not None:
            metrics = BalancerMetrics(settings.balancer.policy, connect(settings))
            serve_metrics(metrics.registry, settings.metrics_port)
        balancer = Balancer(conn, connect(settings, decode=False), settings, metrics=metrics)

        def _stop(signum: int, frame: FrameType | None) -> None:
            balancer.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        balancer.run()
