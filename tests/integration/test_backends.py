"""What backends add to the pipeline: chat requests, token counts, engine health, transient errors."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import Future

import pytest
import redis

from gpulb import keys
from gpulb.models import WorkerState
from producer import Client
from tests.conftest import waiting
from tests.integration.conftest import StartWorker, balancer, work
from worker.backends.base import BackendOutput, BackendRequest, EngineLoad, EngineUnavailable, failed
from worker.backends.simulated import LinearSimulatedBackend, SimulatedBackend
from worker.execution import ExecutionPolicy, IsolatingExecutor

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]


class FlakyEngine(LinearSimulatedBackend):
    """A static engine that answers every request, but says "busy" (like a 503) for the first ``busy_calls`` calls."""

    def __init__(self, busy_calls: int) -> None:
        super().__init__(1e6)
        self.busy_calls, self.calls = busy_calls, 0

    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        self.calls += 1
        if self.calls <= self.busy_calls:
            return [failed("HTTP 503 Service Unavailable", retryable=True) for _ in requests]
        return super().generate(requests)


class BusyEngine(SimulatedBackend):
    """A continuous engine that says "busy" (like a 503) to its first ``busy_calls`` requests; health settable."""

    def __init__(self, busy_calls: int) -> None:
        super().__init__(1e6)
        self.busy_calls, self.calls = busy_calls, 0
        self.ok = True

    def submit(self, request: BackendRequest) -> Future[BackendOutput]:
        self.calls += 1
        if self.calls > self.busy_calls:
            return super().submit(request)
        future: Future[BackendOutput] = Future()
        future.set_result(failed("HTTP 503 Service Unavailable", retryable=True))
        return future

    def healthy(self) -> bool:
        return self.ok

    def engine_load(self) -> EngineLoad:
        return EngineLoad(running=3, waiting=4, kv_cache_usage=0.625, generated_tokens=99)


class TestChatRequests:
    def test_chat_and_prompt_requests_share_a_batch_with_token_counts(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        worker = start_worker("w")
        batch = client.submit_batch([{"messages": CHAT, "max_tokens": 3}, "one two"], model="m", max_tokens=2)
        while balancer(conn).dispatch_round():
            work(worker, redis_url)
        chat, plain = batch.results(timeout=5)
        assert chat.text == "system: be brief"  # the simulated engine echoes "system: be brief\nuser: hi\n"
        assert (chat.output_tokens, chat.prompt_tokens, chat.finish_reason) == (3, 5, "length")
        assert (plain.text, plain.output_tokens, plain.prompt_tokens) == ("one two", 2, 2)


class TestTransientErrors:
    def test_busy_answers_are_retried_with_backoff_and_counted_as_attempts(self) -> None:
        engine = FlakyEngine(busy_calls=2)
        executor = IsolatingExecutor(engine, ExecutionPolicy(max_attempts=3, retry_backoff_s=0.01), threading.Event())
        outcomes = executor.run([BackendRequest("a b", 2), BackendRequest("c", 1)], 1e6)
        assert [(o.output.text, o.output.error, o.tries) for o in outcomes] == [("a b", None, 3), ("c", None, 3)]
        assert engine.calls == 3  # one call per try for the pair, never split: the engine was busy, not them

    def test_still_busy_after_its_tries_raises_engine_unavailable(self) -> None:
        engine = FlakyEngine(busy_calls=10)
        executor = IsolatingExecutor(engine, ExecutionPolicy(max_attempts=2, retry_backoff_s=0.01), threading.Event())
        with pytest.raises(EngineUnavailable, match="after 2 tries: HTTP 503 Service Unavailable"):
            executor.run([BackendRequest("a", 1)], 1e6)
        assert engine.calls == 2

    def test_a_busy_engine_hands_the_micro_batch_back_for_another_worker(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        busy = start_worker("busy", max_batch=8, retry_backoff_s=0.01, engine=BusyEngine(busy_calls=100))
        batch = client.submit_batch([f"p{i}" for i in range(8)], model="m", max_tokens=1)
        assert balancer(conn).dispatch_round() == 8
        work(busy, redis_url)  # three tries, all 503: handed back, one attempt charged, nothing recorded
        assert len(waiting(conn, "m")) == 8 and batch.status().completed == 0
        busy.lifecycle.deregister()
        healthy = start_worker("healthy")
        while balancer(conn).dispatch_round():
            work(healthy, redis_url)
        results = batch.results(timeout=5)
        assert [(r.worker, r.attempts, r.ok) for r in results] == [("healthy", 2, True)] * 8


class TestEngineHealth:
    def test_unhealthy_engine_takes_no_work_and_hands_its_queue_back(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        engine = BusyEngine(busy_calls=0)
        sick = start_worker("sick", max_batch=4, engine=engine)
        batch = client.submit_batch([f"p{i}" for i in range(8)], model="m", max_tokens=1)
        assert balancer(conn).dispatch_round() == 8
        engine.ok = False
        sick.lifecycle.beat()
        load = conn.hgetall(keys.load_key("sick"))
        assert load["state"] == WorkerState.UNHEALTHY.value
        assert (load["engine_running"], load["engine_waiting"], load["kv_cache_usage"]) == ("3", "4", "0.625")
        assert conn.llen(keys.rq_queue_key("sick")) == 0 and len(waiting(conn, "m")) == 8
        assert balancer(conn).dispatch_round() == 0  # nothing goes to an unhealthy worker
        engine.ok = True
        sick.lifecycle.beat()
        assert conn.hget(keys.load_key("sick"), "state") == WorkerState.IDLE.value
        while balancer(conn).dispatch_round():
            work(sick, redis_url)
        results = batch.results(timeout=5)
        assert [r.attempts for r in results] == [1] * 8 and all(r.ok for r in results)


class DeadEngine(BusyEngine):
    """An engine that cannot come back in this process (vLLM's EngineDeadError)."""

    def dead(self) -> bool:
        return not self.ok


class TestDeadEngine:
    def test_a_worker_whose_engine_died_hands_its_work_back_and_stops_itself(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        engine = DeadEngine(busy_calls=0)
        worker = start_worker("w", max_batch=4, engine=engine)
        client.submit_batch([f"p{i}" for i in range(8)], model="m", max_tokens=1)
        assert balancer(conn).dispatch_round() == 8
        signals: list[tuple[int, int]] = []
        monkeypatch.setattr("os.kill", lambda pid, sig: signals.append((pid, sig)))
        engine.ok = False
        worker.lifecycle.beat()
        assert (
            signals == [(os.getpid(), signal.SIGTERM)] and worker.health.engine_died
        )  # exits with code 3 after its drain
        assert len(waiting(conn, "m")) == 8 and conn.llen(keys.rq_queue_key("w")) == 0
        worker.lifecycle.beat()
        assert len(signals) == 1  # once


class TestStatusWhileBusy:
    def test_status_shows_a_worker_busy_with_its_slots_in_use_while_requests_run(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        from gpulb.cli.status import read_fleet_status, render_table
        from tests.integration.test_reliability import work_until_admitted

        w = start_worker("w", tokens_per_s=0.5, max_batch=3)  # requests stay in the engine for minutes
        client.submit_batch([{"prompt": f"p{i}", "ignore_eos": True} for i in range(5)], model="m", max_tokens=50)
        assert balancer(conn).dispatch_round() == 5
        work_until_admitted(w, redis_url)  # the RQ jobs have ended: RQ says idle, the engine is busy
        w.lifecycle.beat()
        (row,) = read_fleet_status(conn).workers
        assert (row.state, row.running, row.slots, row.slots_text) == ("busy", 5, 128, "5/128")
        assert any(
            line.split()[3:5] == ["busy", "5/128"] for line in render_table(read_fleet_status(conn)).splitlines()
        )
        w.engine.stop_runner()
