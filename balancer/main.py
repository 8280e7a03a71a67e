"""Start the balancer process; SIGTERM/SIGINT stop it after the current round."""

from __future__ import annotations

import signal
from types import FrameType

from balancer.dispatcher import Balancer
from gpulb.connection import broker_errors, connect
from gpulb.settings import Settings


def run_balancer(settings: Settings) -> None:
    with broker_errors(settings.redis_url):
        conn = connect(settings)
        conn.ping()
        balancer = Balancer(conn, connect(settings, decode=False), settings)

        def _stop(signum: int, frame: FrameType | None) -> None:
            balancer.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        balancer.run()
