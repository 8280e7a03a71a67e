"""The pipeline against a real redis-server: submit, dispatch, run, record, read back."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import zlib

import pytest
import redis
from rq.job import Job
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from balancer.dispatcher import NOT_ACCEPTING
from balancer.policy import WorkerView
from gpulb import keys
from gpulb.errors import BatchNotFound, WorkerIdInUse
from gpulb.models import BatchState
from producer import Client
from tests.conftest import make_settings, waiting
from tests.integration.conftest import StartWorker, balancer, run_now, work
from worker.heartbeat import Heartbeat
from worker.main import build_rq_worker


def assert_settled(conn: redis.Redis, worker_ids: list[str], model: str = "m") -> None:
    """No request is left anywhere but in its batch's results."""
    assert waiting(conn, model) == []
    assert conn.keys("gpulb:mb:*") == []
    for w in worker_ids:
        assert conn.hgetall(keys.credit_key(w)) in ({}, {"batches": "0", "tokens": "0", "requests": "0"})
        assert conn.scard(keys.inflight_key(w)) == 0


class TestRoundTrip:
    def test_every_request_comes_back_once_and_correct(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        fast, slow = start_worker("fast", max_batch=8), start_worker("slow", max_batch=8)
        requests = [{"prompt": f"w{i} x", "max_tokens": 1 + i % 5} for i in range(50)]
        batch = client.submit_batch(requests, model="m")
        assert batch.status().pending == 50
        bal = balancer(conn)
        while bal.dispatch_round():
            work(fast, redis_url)
            work(slow, redis_url)
        results = batch.results(timeout=5)
        assert [r.index for r in results] == list(range(50))
        assert [r.request_id for r in results] == [f"{batch.id}-{i}" for i in range(50)]
        for r, req in zip(results, requests, strict=True):
            assert r.error is None and r.attempts == 1
            assert r.output_tokens == req["max_tokens"]
            assert r.text == " ".join(([f"w{r.index}", "x"] * 5)[: int(req["max_tokens"])])  # type: ignore[call-overload]
            assert r.worker in {"fast", "slow"}
            assert r.submitted_at <= r.started_at <= r.finished_at
        assert {r.worker for r in results} == {"fast", "slow"}
        status = batch.status()
        assert (status.state, status.completed, status.failed, status.running, status.pending) == (
            BatchState.COMPLETED, 50, 0, 0, 0,
        )  # fmt: skip
        assert_settled(conn, ["fast", "slow"])

    def test_key_schema_after_a_run(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w1")
        batch = client.submit_batch(["a", "b"], model="m")
        balancer(conn).dispatch_round()
        work(w, redis_url)
        batch.wait(timeout=5)
        gpulb_keys = sorted(k for k in conn.keys("gpulb:*"))
        assert gpulb_keys == sorted([
            "gpulb:seq", "gpulb:models", "gpulb:workers", "gpulb:batches", "gpulb:{m}:ingress_tokens",
            "gpulb:{m}:ingress_requests",
            "gpulb:balancer:wakeup",
            f"gpulb:batch:{batch.id}", f"gpulb:batch:{batch.id}:results",
            "gpulb:worker:w1:load", "gpulb:worker:w1:credit",
        ])  # fmt: skip
        assert conn.ttl(f"gpulb:batch:{batch.id}") > 0  # done batches expire
        assert conn.ttl(f"gpulb:batch:{batch.id}:results") > 0
        assert conn.ttl("gpulb:worker:w1:load") > 0

    def test_get_batch_reattaches_from_another_client(self, client: Client, redis_url: str) -> None:
        batch = client.submit_batch(["a", "b", "c"], model="m")
        with Client(redis_url) as other:
            again = other.get_batch(batch.id)
            assert (again.id, again.total, again.status().pending) == (batch.id, 3, 3)
            with pytest.raises(BatchNotFound, match="batch 0123456789abcdef not found"):
                other.get_batch("0123456789abcdef")

    def test_waiting_without_workers_times_out(self, client: Client) -> None:
        batch = client.submit_batch(["a"], model="m")
        with pytest.raises(TimeoutError, match=f"batch {batch.id} not finished after 0.2 s"):
            batch.wait(timeout=0.2)
        handle = client.submit("hello", model="m")
        with pytest.raises(TimeoutError):
            handle.result(timeout=0.1)

    def test_sampling_fields_reach_the_worker(self, client: Client, conn: redis.Redis) -> None:
        handle = client.submit("hi", model="m", max_tokens=4, temperature=0.3, seed=11)
        stored = json.loads(conn.hget(keys.batch_requests_key(handle.batch.id), "0"))  # type: ignore[arg-type]
        assert stored == {"prompt": "hi", "max_tokens": 4, "sampling": {"temperature": 0.3, "seed": 11}}


class TestDispatch:
    def test_one_rq_job_per_micro_batch_json_only_and_credit_bounded(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        start_worker("w1", max_batch=5, backend="simulated-linear")  # a static engine: credit in micro-batches
        client.submit_batch([f"p{i}" for i in range(30)], model="m")
        placed = balancer(conn, max_outstanding_batches=2).dispatch_round()
        assert placed == 10  # 2 micro-batches of 5: the other 20 wait in the ingress (late binding)
        assert len(waiting(conn, "m")) == 20
        rq_conn = redis.Redis.from_url(redis_url)
        queue = Queue("w1", connection=rq_conn, serializer=JSONSerializer)
        job_ids = queue.job_ids
        assert len(job_ids) == 2
        for job_id in job_ids:
            job = Job.fetch(job_id, connection=rq_conn, serializer=JSONSerializer)
            assert (job.func_name, job.args, job.origin, job.get_status()) == (keys.JOB_FUNC, [job_id], "w1", "queued")
            raw = zlib.decompress(rq_conn.hget(keys.rq_job_key(job_id), "data"))  # type: ignore[arg-type]
            assert json.loads(raw)[0] == keys.JOB_FUNC  # JSON on the wire, never pickle
            assert len(conn.hget(keys.microbatch_key(job_id), "entries").split()) == 5  # type: ignore[union-attr]
        assert conn.hgetall(keys.credit_key("w1")) == {"batches": "2", "tokens": str(10 * 16), "requests": "10"}

    def test_a_continuous_engine_holds_its_slots_and_a_small_queue(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        start_worker("w1", max_batch=5, slots=8, queue_slots=4)
        client.submit_batch([f"p{i}" for i in range(30)], model="m")
        assert balancer(conn).dispatch_round() == 12  # 8 slots + 4 queued, in micro-batches of at most 5
        assert [len(conn.hget(keys.microbatch_key(j), "entries").split())  # type: ignore[union-attr]
                for j in conn.lrange(keys.rq_queue_key("w1"), 0, -1)] == [5, 5, 2]  # fmt: skip
        assert conn.hgetall(keys.credit_key("w1")) == {"batches": "3", "tokens": str(12 * 16), "requests": "12"}
        assert len(waiting(conn, "m")) == 18
        assert balancer(conn).dispatch_round() == 0  # no free slot: the rest waits (late binding)

    @pytest.mark.parametrize("case", ["draining", "gone", "other-model"])
    def test_refuses_a_worker_that_cannot_take_work(
        self, case: str, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        runtime = start_worker("w1")
        if case == "draining":
            runtime.health.start_draining()
            runtime.load.publish()
        elif case == "gone":
            conn.delete(keys.load_key("w1"))
        client.submit_batch(["a", "b"], model="m")
        model = "other" if case == "other-model" else "m"
        if model == "other":
            client.submit_batch(["a", "b"], model="other")
        view = WorkerView("w1", model, capacity=8, tokens_per_s=1000)
        result = balancer(conn).dispatch(view, 10_000)
        assert result.status == NOT_ACCEPTING
        assert len(waiting(conn, model)) == 2
        assert conn.llen(keys.rq_queue_key("w1")) == 0

    def test_higher_priority_goes_first(self, client: Client, conn: redis.Redis, start_worker: StartWorker) -> None:
        start_worker("w1", max_batch=1, backend="simulated-linear")
        low = client.submit_batch(["low"] * 3, model="m", priority=0)
        high = client.submit_batch(["high"] * 2, model="m", priority=5)
        balancer(conn, max_outstanding_batches=1).dispatch_round()
        (job_id,) = conn.lrange(keys.rq_queue_key("w1"), 0, -1)
        assert conn.hget(keys.microbatch_key(job_id), "entries").startswith(f"{high.id}:0:")  # type: ignore[union-attr]
        assert low.status().pending == 3

    def test_micro_batch_is_cut_to_the_token_budget(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        start_worker("w1")
        client.submit_batch([{"prompt": "p", "max_tokens": 100}] * 10, model="m")
        view = WorkerView("w1", "m", capacity=64, tokens_per_s=1000)
        result = balancer(conn).dispatch(view, 350)
        assert (result.requests, result.tokens, result.next_cost) == (3, 300, 100)
        assert int(conn.get(keys.ingress_tokens_key("m"))) == 700  # type: ignore[arg-type]

    def test_runs_of_requests_are_cut_in_order_and_split_exactly(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        """300 requests wait as 3 members (runs of 128); micro-batches of 50 cut across them in order."""
        start_worker("w1", max_batch=50, backend="simulated-linear")
        prompts = [{"prompt": "p", "max_tokens": 1 + i % 7} for i in range(300)]
        batch = client.submit_batch(prompts, model="m")
        assert conn.zcard(keys.ingress_key("m")) == 3
        before = waiting(conn)
        assert [r.start for r, _ in before] == list(range(300))
        assert balancer(conn, max_outstanding_batches=100).dispatch_round() == 300
        cut = []
        for job_id in conn.lrange(keys.rq_queue_key("w1"), 0, -1):
            mb = conn.hgetall(keys.microbatch_key(job_id))
            scores = [float(s) + k for run in mb["scores"].split() for s, n in [run.split("x")] for k in range(int(n))]
            cut += zip(mb["entries"].split(), scores, strict=True)
        assert len(cut) == 300 and waiting(conn) == []
        assert cut == [(str(r), score) for r, score in before]  # every request once, in order, its own score
        assert [keys.parse_ingress_member(m).costs[0] for m, _ in cut] == [1 + i % 7 for i in range(300)]
        assert batch.status().pending == 300  # dispatched is not started

    def test_the_tail_of_a_backlog_goes_longest_first_and_what_stays_keeps_its_place(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        """A backlog that fits in the engines' slots is a tail: the longest requests start first."""
        w = start_worker("w", slots=8, queue_slots=0, max_batch=3)
        lengths = [5, 50, 10, 40, 30, 20]
        batch = client.submit_batch([{"prompt": "p", "max_tokens": n} for n in lengths], model="m")
        before = dict((r.start, score) for r, score in waiting(conn))
        assert balancer(conn).dispatch_round() == 6
        cut = []
        for job_id in conn.lrange(keys.rq_queue_key("w"), 0, -1):
            mb = conn.hgetall(keys.microbatch_key(job_id))
            scores = [float(s) + k for run in mb["scores"].split() for s, n in [run.split("x")] for k in range(int(n))]
            cut.append([(keys.parse_ingress_member(m).start, score) for m, score in zip(mb["entries"].split(), scores,
                                                                                        strict=True)])  # fmt: skip
        assert [[i for i, _ in mb] for mb in cut] == [[1, 3, 4], [5, 2, 0]]  # 50 40 30, then 20 10 5
        assert all(score == before[i] for mb in cut for i, score in mb)  # each keeps its own place
        work(w, redis_url)
        assert [r.output_tokens <= n for r, n in zip(batch.results(timeout=10), lengths, strict=True)] == [True] * 6
        assert_settled(conn, ["w"])

    def test_what_the_tail_leaves_of_a_run_goes_back_as_runs(
        self, client: Client, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        start_worker("w", slots=8, queue_slots=0, max_batch=2)
        client.submit_batch([{"prompt": "p", "max_tokens": n} for n in [1, 9, 2, 3, 8, 4]], model="m")
        before = waiting(conn)
        view = WorkerView("w", "m", capacity=2, tokens_per_s=1000, slots=8)
        assert balancer(conn).dispatch(view, 10**6, max_requests=2, longest_first=True).requests == 2
        runs = [keys.parse_ingress_member(m) for m in conn.zrange(keys.ingress_key("m"), 0, -1)]
        assert [(r.start, r.costs) for r in runs] == [(0, (1,)), (2, (2, 3)), (5, (4,))]
        assert waiting(conn) == [(r, s) for r, s in before if r.start in (0, 2, 3, 5)]

    def test_a_run_holds_one_affinity_key(self, client: Client, conn: redis.Redis) -> None:
        sessions = ["a", "a", "b", "b", "b", None, None, "a"]
        client.submit_batch([{"prompt": "p", "session": s} if s else "p" for s in sessions], model="m")
        runs = [keys.parse_ingress_member(m) for m in conn.zrange(keys.ingress_key("m"), 0, -1)]
        assert [len(r.costs) for r in runs] == [2, 3, 2, 1]
        assert [r.affinity == "" for r in runs] == [False, False, True, False]
        assert len({r.affinity for r in runs}) == 3


class TestExactlyOnce:
    def test_a_result_is_recorded_only_once(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w1")
        batch = client.submit_batch(["a b"], model="m", max_tokens=3)
        balancer(conn).dispatch_round()
        (mb_id,) = conn.lrange(keys.rq_queue_key("w1"), 0, -1)
        entries = conn.hget(keys.microbatch_key(mb_id), "entries")
        work(w, redis_url)
        first = batch.results(timeout=5)[0]
        # the same micro-batch run again (a late duplicate) must not overwrite or double-count
        conn.hset(keys.microbatch_key(mb_id), mapping={"entries": entries, "tokens": 3})  # type: ignore[arg-type]
        conn.hset(keys.batch_requests_key(batch.id), "0", '{"prompt": "z", "max_tokens": 3}')
        run_now(w, mb_id)
        assert batch.results(timeout=5)[0] == first
        status = batch.status()
        assert (status.completed, status.failed, status.running) == (1, 0, 0)


class TestWorkerLifecycle:
    def test_deregister_hands_queued_work_back_in_order(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        leaving = start_worker("leaving", max_batch=4)
        batch = client.submit_batch([f"p{i}" for i in range(12)], model="m")
        before = waiting(conn)
        assert balancer(conn).dispatch_round() == 12  # three micro-batches queued
        leaving.lifecycle.deregister()
        assert waiting(conn) == before  # each request at its own place again
        assert conn.llen(keys.rq_queue_key("leaving")) == 0 and conn.keys("rq:job:*") == []
        assert not conn.exists(keys.load_key("leaving")) and not conn.sismember(keys.workers_key(), "leaving")
        assert_settled_credit = conn.hgetall(keys.credit_key("leaving"))
        assert assert_settled_credit == {"batches": "0", "tokens": "0", "requests": "0"}
        staying = start_worker("staying")
        while balancer(conn).dispatch_round():
            work(staying, redis_url)
        assert {r.worker for r in batch.results(timeout=5)} == {"staying"}
        assert batch.status().completed == 12

    def test_a_live_worker_id_cannot_be_taken_twice(self, start_worker: StartWorker) -> None:
        first = start_worker("w1", load_ttl_s=1.0)
        beat = Heartbeat(first.lifecycle.beat, 0.1)
        beat.start()
        try:
            with pytest.raises(WorkerIdInUse, match="worker id 'w1' is in use by a live worker"):
                start_worker("w1", load_ttl_s=1.0)
        finally:
            beat.stop()

    def test_workers_racing_for_one_id_register_exactly_once(
        self, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        """They all found no load key; RQ then killed all but one with a traceback. Now the id is claimed with SET
        NX first: one registers, the others refuse with WorkerIdInUse once its load key proves it live."""
        racers = 4
        gate = threading.Barrier(racers)
        winners: list[Heartbeat] = []
        refused: list[str] = []

        def race() -> None:
            gate.wait()
            try:
                runtime = start_worker("w1", load_ttl_s=1.0)
            except WorkerIdInUse as exc:
                refused.append(str(exc))
                return
            winners.append(Heartbeat(runtime.lifecycle.beat, 0.1))
            winners[-1].start()

        threads = [threading.Thread(target=race) for _ in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        try:
            assert len(winners) == 1 and len(refused) == racers - 1
            assert all("worker id 'w1' is in use by a live worker" in message for message in refused)
            assert conn.smembers(keys.workers_key()) == {"w1"} and conn.exists(keys.load_key("w1"))
            assert not conn.exists(keys.worker_claim_key("w1"))  # registered: the load key guards the id
        finally:
            for beat in winners:
                beat.stop()

    def test_a_claim_left_by_a_dead_process_of_this_host_is_taken_over_at_once(
        self, conn: redis.Redis, start_worker: StartWorker
    ) -> None:
        """Killed while registering and restarted at once (as the chaos runs do): no wait for the claim's TTL."""
        gone = subprocess.Popen(["true"])
        gone.wait()
        conn.set(keys.worker_claim_key("w1"), f"{socket.gethostname()}:{gone.pid}", ex=30)
        started = time.monotonic()
        start_worker("w1", load_ttl_s=1.0)
        assert time.monotonic() - started < 1.0
        assert conn.smembers(keys.workers_key()) == {"w1"} and not conn.exists(keys.worker_claim_key("w1"))

    def test_a_dead_predecessor_is_waited_out_and_its_work_taken_back(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        start_worker("w1", load_ttl_s=1.0, max_batch=4)
        batch = client.submit_batch([f"p{i}" for i in range(8)], model="m")
        assert balancer(conn).dispatch_round() == 8  # two micro-batches now belong to w1, which "dies"
        conn.hset(keys.load_key("w1"), "host", "elsewhere")  # not our host: its pid cannot be checked
        successor = start_worker("w1", load_ttl_s=1.0)  # waits for the stale key to expire, then recovers
        assert len(waiting(conn, "m")) == 8 and conn.llen(keys.rq_queue_key("w1")) == 0
        while balancer(conn).dispatch_round():
            work(successor, redis_url)
        assert [r.attempts for r in batch.results(timeout=5)] == [1] * 8  # queued, never started: no attempt
        assert_settled(conn, ["w1"])


class TestOnlyOurOwnJobs:
    def test_foreign_function_is_refused_not_imported(
        self, conn: redis.Redis, redis_url: str, start_worker: StartWorker, tmp_path: object
    ) -> None:
        w = start_worker("w1")
        rq_conn = redis.Redis.from_url(redis_url)
        job = Queue("w1", connection=rq_conn, serializer=JSONSerializer).enqueue("os.remove", "/nonexistent")
        work(w, redis_url)
        job.refresh()
        assert job.get_status() == "failed"
        assert job.id in FailedJobRegistry("w1", connection=rq_conn, serializer=JSONSerializer).get_job_ids()
        assert re.search(r"foreign job function 'os.remove' refused", job.latest_result().exc_string)  # type: ignore[union-attr]


class TestRqBooks:
    def test_rq_sees_the_job_run_and_finish_as_with_its_own_loop(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w1")
        batch = client.submit_batch(["a", "b"], model="m")
        assert balancer(conn).dispatch_round() == 2
        job_id = conn.lindex(keys.rq_queue_key("w1"), 0)
        work(w, redis_url)
        assert all(r.ok for r in batch.results(timeout=5))
        rq_conn = redis.Redis.from_url(redis_url)
        job = Job.fetch(str(job_id), connection=rq_conn, serializer=JSONSerializer)
        assert job.get_status() == "finished" and job.worker_name == "w1"
        assert job.started_at is not None and job.ended_at is not None and job.last_heartbeat is not None
        assert job.latest_result().return_value == {"requests": 2, "admitted": 2}  # type: ignore[union-attr]
        assert job.id in FinishedJobRegistry("w1", connection=rq_conn, serializer=JSONSerializer).get_job_ids()
        assert StartedJobRegistry("w1", connection=rq_conn, serializer=JSONSerializer).get_job_ids() == []
        assert conn.llen(keys.rq_intermediate_key("w1")) == 0
        assert int(conn.ttl(keys.rq_job_key(str(job_id)))) > 0  # expires after its result TTL, as RQ sets
        worker = conn.hgetall(f"{SimpleWorker.redis_worker_namespace_prefix}w1")
        assert worker["successful_job_count"] == "1" and "current_job" not in worker
        assert float(worker["total_working_time"]) > 0

    def test_after_a_failed_job_the_worker_hash_gets_its_idle_ttl_back(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        """A job sets the worker hash's TTL to its own (timeout + 60 s); the beat after a failure must undo it,
        or the hash expires during the next BLMOVE wait and `rq info` loses a live worker."""
        w = start_worker("w1", backend="simulated-linear")
        client.submit_batch(["a"], model="m")
        assert balancer(conn, job_timeout_s=10).dispatch_round() == 1

        def backend_bug(*_: object) -> None:
            raise RuntimeError("backend bug")

        monkeypatch.setattr(w.execution, "execute_and_record", backend_bug)
        rq_worker = build_rq_worker(make_settings(redis_url), w)
        rq_worker.register_birth()
        job, queue = rq_worker.dequeue_job_and_maintain_ttl(None)
        rq_worker.execute_job(job, queue)
        assert job.get_status(refresh=True) == "failed"
        rq_worker.heartbeat()  # what RQ's work loop does after every job
        assert conn.ttl(f"{SimpleWorker.redis_worker_namespace_prefix}w1") > rq_worker.worker_ttl

    def test_scripts_lost_by_a_redis_restart_are_loaded_again(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w1")
        batch = client.submit_batch(["a", "b"], model="m")
        assert balancer(conn).dispatch_round() == 2
        conn.script_flush()  # as after a restart without persistence of scripts: EVALSHA meets NOSCRIPT
        work(w, redis_url)
        assert [r.ok for r in batch.results(timeout=5)] == [True, True]
        assert_settled(conn, ["w1"])
