"""``--metrics-port``: a balancer and workers expose gpulb_* metrics that add up to what was served."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpulb.cli.redis_server import free_port
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client

pytestmark = pytest.mark.e2e


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lbl, v in samples.get(name, []) if all(lbl.get(k) == x for k, x in labels.items()))


class TestMetrics:
    def test_balancer_and_worker_metrics_count_what_was_served(self, redis_url: str, tmp_path: Path) -> None:
        bal_port, w_ports = free_port(), [free_port(), free_port()]
        workers = [WorkerSpec(f"g{i}", "m", 50_000, args=("--metrics-port", str(p))) for i, p in enumerate(w_ports)]
        env = {"GPULB_METRICS_PORT": str(bal_port), "GPULB_WORKER__HEARTBEAT_S": "0.2"}
        with LocalStack(redis_url, workers, tmp_path, env=env), Client(redis_url) as client:
            results = client.submit_batch([f"p {i}" for i in range(120)], model="m", max_tokens=3).results(timeout=60)
            time.sleep(1.0)  # the speed is read off the engine's counter over heartbeat windows (0.2 s here)
            balancer = scrape(bal_port)
            per_worker = [scrape(p) for p in w_ports]
        served = {w: sum(1 for r in results if r.worker == w) for w in ("g0", "g1")}
        assert total(balancer, "gpulb_dispatched_requests_total", policy="least-time") == 120
        for i, worker in enumerate(("g0", "g1")):
            assert total(balancer, "gpulb_dispatched_requests_total", worker=worker) == served[worker]
            assert total(per_worker[i], "gpulb_requests_total", worker=worker, outcome="completed") == served[worker]
            assert total(per_worker[i], "gpulb_request_service_seconds_count", worker=worker) == served[worker]
            assert total(per_worker[i], "gpulb_request_queue_wait_seconds_count", worker=worker) == served[worker]
            assert total(per_worker[i], "gpulb_worker_tokens_per_second", worker=worker) > 0
        assert total(balancer, "gpulb_ingress_requests", model="m") == 0
        assert total(balancer, "gpulb_decision_seconds_count") == total(balancer, "gpulb_dispatches_total")
