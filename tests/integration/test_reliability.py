"""Faults in-process against a real redis-server: dead workers, poison, hangs, cancellation, bad data."""

from __future__ import annotations

import pickle
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
import redis
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from gpulb import keys
from gpulb.models import BatchState
from producer import Client
from tests.conftest import make_settings, waiting
from tests.integration.conftest import StartWorker, balancer, run_now, start_running, work
from tests.integration.test_pipeline import assert_settled
from worker.backends.base import BackendOutput, BackendRequest
from worker.backends.simulated import FAIL_MARKER, HANG_MARKER
from worker.main import WorkerParts, build_rq_worker


def queued_ids(conn: redis.Redis, worker_id: str) -> list[str]:
    return conn.lrange(keys.rq_queue_key(worker_id), 0, -1)  # type: ignore[return-value]


def work_until_admitted(worker: WorkerParts, redis_url: str) -> None:
    """Run the worker's RQ jobs (each admits its micro-batch into the engine) without waiting for results."""
    build_rq_worker(make_settings(redis_url), worker).work(burst=True)


def kill(conn: redis.Redis, worker_id: str) -> None:
    """What a SIGKILL looks like from Redis once the TTL passed: the load key is gone."""
    conn.delete(keys.load_key(worker_id))


class TestDeadWorker:
    def test_requests_admitted_into_a_dead_workers_engine_are_requeued_and_its_rq_job_failed(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        """A continuous worker's RQ job ends once its requests are in the engine; if the worker dies before they
        are recorded, they go back to the ingress (one attempt charged) and RQ's books say the job failed."""
        dead = start_worker("dead", tokens_per_s=0.5, max_batch=3)  # an engine that holds them for minutes
        batch = client.submit_batch(
            [{"prompt": f"p{i}", "ignore_eos": True} for i in range(6)], model="m", max_tokens=50
        )
        assert balancer(conn).dispatch_round() == 6
        jobs = queued_ids(conn, "dead")
        work_until_admitted(dead, redis_url)
        rq_conn = redis.Redis.from_url(redis_url)
        finished = FinishedJobRegistry("dead", connection=rq_conn, serializer=JSONSerializer)
        assert sorted(finished.get_job_ids()) == sorted(jobs) and dead.engine.in_flight == 6
        assert batch.status().running == 6
        kill(conn, "dead")
        assert balancer(conn).dispatch_round() == 0  # reaps: no live worker to dispatch to
        assert sorted(r.attempt for r, _ in waiting(conn)) == [1] * 6
        failed = FailedJobRegistry("dead", connection=rq_conn, serializer=JSONSerializer)
        assert sorted(failed.get_job_ids()) == sorted(jobs) and finished.get_job_ids() == []
        assert (batch.status().running, batch.status().pending) == (0, 6)
        dead.engine.stop_runner()
        alive = start_worker("alive")
        while balancer(conn).dispatch_round():
            work(alive, redis_url)
        assert [(r.worker, r.attempts) for r in batch.results(timeout=5)] == [("alive", 2)] * 6

    def test_started_and_queued_work_is_requeued_and_finished_elsewhere(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        dead = start_worker("dead", max_batch=3)
        batch = client.submit_batch([f"p{i}" for i in range(6)], model="m")
        assert balancer(conn).dispatch_round() == 6
        running_mb, queued_mb = queued_ids(conn, "dead")
        conn.lmove(keys.rq_queue_key("dead"), keys.rq_intermediate_key("dead"))  # RQ dequeued one...
        start_running(dead, running_mb)  # ...the worker started it...
        kill(conn, "dead")  # ...and died
        assert balancer(conn).dispatch_round() == 0  # reaps (no live worker to dispatch to)
        assert sorted(r.attempt for r, _ in waiting(conn)) == [0, 0, 0, 1, 1, 1]  # attempts: started ones +1
        assert queued_ids(conn, "dead") == [] and not conn.sismember(keys.workers_key(), "dead")
        assert batch.status().running == 0 and batch.status().pending == 6
        rq_conn = redis.Redis.from_url(redis_url)
        assert running_mb in FailedJobRegistry("dead", connection=rq_conn, serializer=JSONSerializer).get_job_ids()
        assert not conn.exists(keys.rq_job_key(queued_mb))
        alive = start_worker("alive")
        while balancer(conn).dispatch_round():
            work(alive, redis_url)
        results = batch.results(timeout=5)
        assert {r.worker for r in results} == {"alive"}
        assert sorted(r.attempts for r in results) == [1, 1, 1, 2, 2, 2]
        assert batch.status().completed == 6
        assert_settled(conn, ["dead", "alive"])

    def test_a_request_that_keeps_killing_workers_is_dead_lettered(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        batch = client.submit_batch([{"prompt": "deadly", "custom_id": "req-δ"}], model="m")
        for round_ in range(2):
            w = start_worker(f"victim{round_}", max_attempts=2)
            assert balancer(conn).dispatch_round() == 1
            (mb,) = queued_ids(conn, w.ctx.worker_id)
            conn.lmove(keys.rq_queue_key(w.ctx.worker_id), keys.rq_intermediate_key(w.ctx.worker_id))
            start_running(w, mb)
            kill(conn, w.ctx.worker_id)
            balancer(conn, max_attempts=2).dispatch_round()
        (result,) = batch.results(timeout=5)
        assert result.error == "worker victim1 died while running this request 2 times"
        assert result.attempts == 2 and result.worker == "victim1"
        assert result.custom_id == "req-δ"  # named even though the dead-letter script wrote it
        status = batch.status()
        assert (status.state, status.failed, status.completed, status.running) == (BatchState.COMPLETED, 1, 0, 0)
        assert_settled(conn, ["victim0", "victim1"])

    def test_late_results_of_a_worker_declared_dead_are_not_recorded_twice(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        """SIGSTOP past the TTL: the balancer requeues, another worker finishes, the first one resumes."""
        paused, other = start_worker("paused"), start_worker("other")
        conn.hset(keys.load_key("other"), "state", "draining")  # keep the first dispatch on "paused"
        batch = client.submit_batch(["a b", "c d"], model="m", max_tokens=3)
        balancer(conn).dispatch_round()
        other.load.publish()
        (mb,) = queued_ids(conn, "paused")
        real_submit, paused_once = paused.engine.backend.submit, []

        def submit_while_paused(request: BackendRequest) -> Future[BackendOutput]:
            if not paused_once:
                paused_once.append(True)
                kill(conn, "paused")
                balancer(conn).dispatch_round()  # reaps "paused", re-dispatches to "other"
                for requeued in queued_ids(conn, "other"):
                    run_now(other, requeued)
            return real_submit(request)

        paused.engine.backend.submit = submit_while_paused  # type: ignore[method-assign]
        run_now(paused, mb)  # its late results lose the HSETNX race
        results = batch.results(timeout=5)
        assert [r.worker for r in results] == ["other", "other"]
        status = batch.status()
        assert (status.completed, status.failed, status.running, status.pending) == (2, 0, 0, 0)
        assert conn.hgetall(keys.credit_key("paused")) == {"batches": "0", "tokens": "0", "requests": "0"}


class TestPoisonAndHangs:
    def test_poison_request_is_isolated_retried_then_failed(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w", simulate_faults=True, retry_backoff_s=0.01)
        prompts = [f"fine {i}" for i in range(10)]
        prompts[6] = f"bad {FAIL_MARKER}"
        batch = client.submit_batch(prompts, model="m")
        while balancer(conn).dispatch_round():
            work(w, redis_url)
        results = batch.results(timeout=5)
        assert results[6].error == "SimulatedFault: simulated backend failure"
        assert results[6].attempts == 3  # max_attempts
        assert [r.error for i, r in enumerate(results) if i != 6] == [None] * 9
        status = batch.status()
        assert (status.completed, status.failed) == (9, 1)

    def test_a_hung_backend_call_is_bounded_by_a_timeout(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w", simulate_faults=True, retry_backoff_s=0.01, min_call_timeout_s=0.2)
        batch = client.submit_batch(["ok one", f"stuck {HANG_MARKER}", "ok two", "ok three"], model="m")
        while balancer(conn).dispatch_round():
            work(w, redis_url)
        results = batch.results(timeout=10)
        assert results[1].error is not None and results[1].error.startswith("BackendTimeout: backend did not answer")
        assert [results[i].error for i in (0, 2, 3)] == [None, None, None]
        w.engine.backend.shutdown()  # releases the abandoned threads


class TestCancellation:
    def test_cancel_stops_what_has_not_started(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w", max_batch=4, slots=4, queue_slots=4)
        batch = client.submit_batch([{"prompt": f"p{i}", "custom_id": f"c{i}"} for i in range(20)], model="m")
        assert balancer(conn).dispatch_round() == 8
        first, _second = queued_ids(conn, "w")
        run_now(w, first)  # 4 done before the cancel
        status = batch.cancel()
        assert (status.completed, status.cancelled, status.pending) == (4, 12, 4)
        work(w, redis_url)  # the second micro-batch was queued: the worker cancels it on sight
        results = batch.results(timeout=5)
        assert [r.cancelled for r in results] == [False] * 4 + [True] * 16
        assert all(r.error == "cancelled" for r in results[4:])
        assert [r.custom_id for r in results] == [f"c{i}" for i in range(20)]  # ran, cancelled by worker or script
        status = batch.status()
        assert (status.state, status.completed, status.cancelled, status.failed) == (BatchState.CANCELLED, 4, 16, 0)
        assert_settled(conn, ["w"])

    def test_cancel_catches_the_rest_of_a_run_split_while_it_looked(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from producer import store

        start_worker("w", max_batch=10, slots=10, queue_slots=0)
        batch = client.submit_batch([f"p{i}" for i in range(128)], model="m")  # one run of 128
        real_members, calls = store._batch_members, []

        def then_dispatch(*args: str) -> list[str]:
            members = real_members(*args)
            if not calls:  # the balancer cuts 10 from the run after cancel listed it, before cancel removed it
                calls.append(balancer(conn).dispatch_round())
            return members

        monkeypatch.setattr(store, "_batch_members", then_dispatch)
        status = batch.cancel()
        assert calls == [10] and (status.cancelled, status.pending) == (118, 10)
        assert waiting(conn) == []


class TestBadDataInRedis:
    def test_foreign_ingress_member_is_dropped_and_counted(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w")
        conn.zadd(keys.ingress_key("m"), {"not a gpulb member": -1e15})
        batch = client.submit_batch(["a", "b"], model="m")
        while balancer(conn).dispatch_round():
            work(w, redis_url)
        assert batch.status().completed == 2
        assert conn.hget(keys.stats_key(), "dropped_ingress_members") == "1"

    def test_garbage_load_key_is_skipped_and_counted(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        good = start_worker("good")
        start_worker("garbled")
        conn.hset(keys.load_key("garbled"), mapping={"capacity": "lots", "tokens_per_s": "fast"})
        batch = client.submit_batch(["a", "b", "c"], model="m")
        while balancer(conn).dispatch_round():
            work(good, redis_url)
        assert {r.worker for r in batch.results(timeout=5)} == {"good"}
        assert int(conn.hget(keys.stats_key(), "malformed_load_keys")) >= 1  # type: ignore[arg-type]

    def test_malformed_payload_fails_only_its_request(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w")
        batch = client.submit_batch(["a", "b", "c"], model="m")
        conn.hset(keys.batch_requests_key(batch.id), "1", "{not json")
        while balancer(conn).dispatch_round():
            work(w, redis_url)
        results = batch.results(timeout=5)
        assert results[1].error is not None and results[1].error.startswith("malformed request payload")
        assert (results[0].error, results[2].error) == (None, None)

    def test_pickle_payload_in_a_queue_is_never_unpickled(
        self, conn: redis.Redis, redis_url: str, start_worker: StartWorker, tmp_path: Path
    ) -> None:
        w = start_worker("w")
        canary = tmp_path / "unpickled"
        rq_conn = redis.Redis.from_url(redis_url)
        job = Queue("w", connection=rq_conn, serializer=JSONSerializer).enqueue(keys.JOB_FUNC, "mb-x")
        planted = pickle.dumps(_Canary(str(canary)))  # what an attacker with Redis access could plant
        rq_conn.hset(keys.rq_job_key(job.id), "data", zlib.compress(planted))
        work(w, redis_url)
        assert not canary.exists()
        failed = FailedJobRegistry("w", connection=rq_conn, serializer=JSONSerializer).get_job_ids()
        assert failed == [job.id]
        assert conn.hget(keys.stats_key(), "refused_jobs") == "1"


class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "pwned"))  # type: ignore[return-value]


class TestReviewedEdgeCases:
    def test_a_retried_dispatch_call_changes_nothing(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """redis-py re-sends EVALSHA when a reply is lost: the same micro-batch id must not cut twice."""
        from balancer import dispatcher
        from balancer.policy import WorkerView

        start_worker("w", max_batch=2)
        client.submit_batch([f"p{i}" for i in range(6)], model="m")
        monkeypatch.setattr(dispatcher.secrets, "token_hex", lambda n: "0123456789abcdef")
        bal = balancer(conn)
        view = WorkerView("w", "m", capacity=2, tokens_per_s=1000)
        first, again = bal.dispatch(view, 10_000), bal.dispatch(view, 10_000)
        assert (first.status, first.requests, again.status, again.requests) == (1, 2, 1, 2)
        assert len(waiting(conn, "m")) == 4
        assert conn.lrange(keys.rq_queue_key("w"), 0, -1) == ["mb-0123456789abcdef"]
        assert conn.hgetall(keys.credit_key("w")) == {"batches": "1", "tokens": "32", "requests": "2"}

    def test_a_model_whose_workers_all_drain_does_not_crash_the_balancer(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        w = start_worker("w")
        w.health.start_draining()
        w.load.publish()
        client.submit_batch(["a", "b"], model="m")
        assert balancer(conn).dispatch_round() == 0
        assert len(waiting(conn, "m")) == 2

    def test_a_live_worker_sweeps_up_its_orphans(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        """A micro-batch dequeued but never run (its start failed on a Redis blip) must come back."""
        from worker.lifecycle import ORPHAN_SWEEP_BEATS

        w = start_worker("w", max_batch=3)
        batch = client.submit_batch([f"p{i}" for i in range(3)], model="m")
        balancer(conn).dispatch_round()
        conn.lmove(keys.rq_queue_key("w"), keys.rq_intermediate_key("w"))  # RQ took it; nothing ran it
        for _ in range(ORPHAN_SWEEP_BEATS):
            w.lifecycle.beat()
        assert waiting(conn, "m") == []  # one sweep: it may be between BLMOVE and its start, so not yet
        for _ in range(ORPHAN_SWEEP_BEATS):
            w.lifecycle.beat()
        assert len(waiting(conn, "m")) == 3 and conn.scard(keys.inflight_key("w")) == 0
        while balancer(conn).dispatch_round():
            work(w, redis_url)
        assert batch.status().completed == 3

    def test_the_sweep_leaves_a_micro_batch_that_started_between_two_sweeps(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        from worker.lifecycle import ORPHAN_SWEEP_BEATS

        w = start_worker("w", max_batch=3)
        batch = client.submit_batch([f"p{i}" for i in range(3)], model="m")
        balancer(conn).dispatch_round()
        (microbatch_id,) = conn.lrange(keys.rq_queue_key("w"), 0, -1)
        conn.lmove(keys.rq_queue_key("w"), keys.rq_intermediate_key("w"))  # dequeued, not started yet...
        for _ in range(ORPHAN_SWEEP_BEATS):
            w.lifecycle.beat()  # ...when a sweep looks
        w.execution.current_microbatch = microbatch_id  # started by the next sweep
        for _ in range(ORPHAN_SWEEP_BEATS):
            w.lifecycle.beat()
        assert conn.smembers(keys.inflight_key("w")) == {microbatch_id}
        w.execution.current_microbatch = None
        w.execution.run_microbatch(microbatch_id)
        assert [r.attempts for r in batch.results(timeout=5)] == [1, 1, 1]

    def test_deregistering_hands_back_started_orphans_too(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        w = start_worker("w", max_batch=2)
        client.submit_batch([f"p{i}" for i in range(4)], model="m")
        balancer(conn).dispatch_round()
        started, _queued = queued_ids(conn, "w")
        conn.lmove(keys.rq_queue_key("w"), keys.rq_intermediate_key("w"))
        start_running(w, started)  # then SIGTERM during a Redis outage: the run never finished
        w.lifecycle.deregister()
        assert sorted(r.attempt for r, _ in waiting(conn)) == [0, 0, 1, 1]
        assert_settled_credit = conn.hgetall(keys.credit_key("w"))
        assert assert_settled_credit == {"batches": "0", "tokens": "0", "requests": "0"}

    @pytest.mark.parametrize("ran_before_the_error", [True, False])
    def test_a_lost_publish_reply_neither_doubles_nor_drops_the_batch(
        self, ran_before_the_error: bool, client: Client, conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from producer import store

        real_publish, calls = store._publish, []

        def flaky_publish(*args: object, **kwargs: object) -> None:
            calls.append(1)
            if len(calls) == 1:
                if ran_before_the_error:
                    real_publish(*args, **kwargs)  # type: ignore[arg-type]
                raise redis.ConnectionError("connection reset by peer")
            real_publish(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "_publish", flaky_publish)
        batch = client.submit_batch(["a", "b", "c"], model="m", max_tokens=5)
        assert len(calls) == (1 if ran_before_the_error else 2)
        assert len(waiting(conn, "m")) == 3
        assert conn.get(keys.ingress_tokens_key("m")) == "15"
        assert batch.status().pending == 3


def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for a thread of the code under test to get there (it offers nothing to block on)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


class TestStopping:
    def test_a_worker_whose_command_channel_is_idle_stops_within_a_poll(
        self, redis_url: str, start_worker: StartWorker
    ) -> None:
        """RQ polled its command channel every 60 s, and redis-py >= 8.2 waits for that poll when the channel's
        thread stops: a worker asked to stop while the thread sat between polls hung up to a minute (caught as a
        vLLM worker killed by the end-to-end test's 60 s stop limit)."""
        rq_worker = build_rq_worker(make_settings(redis_url), start_worker("w"))
        rq_worker.subscribe()
        pubsub = rq_worker.pubsub
        until(lambda: bool(pubsub.subscribed))  # the thread has read the subscription's confirmation
        pubsub.unsubscribe()  # as RQ's unsubscribe() begins; the thread reads the confirmation, then waits a poll
        until(lambda: not pubsub.subscribed)
        started = time.monotonic()
        rq_worker.unsubscribe()
        assert time.monotonic() - started < 10  # not a speed target: a bound on a hang (it was up to 60 s)
        assert not rq_worker.pubsub_thread.is_alive()
