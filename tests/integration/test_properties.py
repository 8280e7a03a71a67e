"""Property-based tests: validation never half-writes; claim/commit/recover never lose or double a request."""

from __future__ import annotations

from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from balancer.policy import WorkerView
from gpulb import keys
from gpulb.cli.redis_server import RedisServer
from gpulb.connection import connect
from gpulb.errors import InvalidRequest
from gpulb.recovery import RequeueMode, recover_worker, requeue_microbatch
from gpulb.settings import Settings
from producer import Client
from tests.conftest import waiting
from tests.integration.conftest import balancer, run_now, start_running
from worker.backends import create_backend
from worker.main import WorkerParts, build_worker
from worker.microbatch import Item

FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 200_000), st.floats(allow_nan=False, width=32),
    st.text(max_size=8), st.lists(st.text(max_size=3), max_size=2),
)  # fmt: skip
FIELD_NAMES = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "bogus"])
REQUEST = st.one_of(st.text(max_size=10), st.dictionaries(FIELD_NAMES, FIELD_VALUES, max_size=4), st.integers())


class TestValidationProperty:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(requests=st.lists(REQUEST, max_size=6), priority=st.integers(-300, 300))
    def test_a_batch_is_stored_whole_or_not_at_all(
        self, redis_server: RedisServer, requests: list[Any], priority: int
    ) -> None:
        fake = redis.Redis.from_url(redis_server.url, decode_responses=True)  # a real one: publishing is a script
        fake.flushall()
        client = Client(settings=Settings(_env_file=None), connection=fake)  # type: ignore[call-arg]
        try:
            batch = client.submit_batch(requests, model="m", priority=priority)
        except InvalidRequest:
            assert fake.keys("*") == []
            return
        assert batch.status().pending == len(requests) == len(waiting(fake))
        assert fake.hlen(keys.batch_requests_key(batch.id)) == len(requests)


class ClaimCommitMachine(RuleBasedStateMachine):
    """Random interleavings of submit, dispatch, start, finish, crash, release and recover."""

    server: RedisServer

    def __init__(self) -> None:
        super().__init__()
        self.conn = redis.Redis.from_url(self.server.url, decode_responses=True)
        self.conn.flushall()
        self.client = Client(self.server.url)
        self.settings = Settings(_env_file=None, redis_url=self.server.url, max_attempts=3)  # type: ignore[call-arg]
        self.balancer = balancer(self.conn, self.settings)
        self.workers = {w: self._worker(w, cap) for w, cap in (("w0", 3), ("w1", 5))}
        self.submitted: dict[str, int] = {}
        self.paused: list[tuple[str, str, list[Item]]] = []

    def _worker(self, worker_id: str, capacity: int) -> WorkerParts:
        s = self.settings.model_copy(update={"worker": self.settings.worker.model_copy(
            update={"id": worker_id, "model": "m", "tokens_per_s": 1e9, "max_batch": capacity})})  # fmt: skip
        worker = build_worker(connect(s), connect(s, decode=False), s, create_backend(s.worker))
        worker.lifecycle.register()
        return worker

    @rule(n=st.integers(1, 7), priority=st.integers(-2, 2))
    def submit(self, n: int, priority: int) -> None:
        batch = self.client.submit_batch([f"p{i}" for i in range(n)], model="m", priority=priority)
        self.submitted[batch.id] = n

    @rule(worker=st.sampled_from(["w0", "w1"]), budget=st.integers(1, 80))
    def dispatch(self, worker: str, budget: int) -> None:
        cap = self.workers[worker].ctx.cfg.max_batch
        self.balancer.dispatch(WorkerView(worker, "m", capacity=cap, tokens_per_s=1000), budget)

    @rule(worker=st.sampled_from(["w0", "w1"]))
    def finish_next(self, worker: str) -> None:
        mb = self.conn.lpop(keys.rq_queue_key(worker))
        if mb is not None:
            run_now(self.workers[worker], str(mb))  # admitted into the engine, each result recorded as it ends

    @rule(worker=st.sampled_from(["w0", "w1"]))
    def start_and_crash(self, worker: str) -> None:
        mb = self.conn.lpop(keys.rq_queue_key(worker))
        if mb is not None:
            start_running(self.workers[worker], str(mb))

    @rule(worker=st.sampled_from(["w0", "w1"]))
    def release_queued(self, worker: str) -> None:
        for mb in self.conn.lrange(keys.rq_queue_key(worker), 0, -1):
            requeue_microbatch(self.conn, self.workers[worker].ctx.scripts, worker, mb, mode=RequeueMode.RELEASE,
                               max_attempts=3, reason="released")  # fmt: skip

    @rule(worker=st.sampled_from(["w0", "w1"]))
    def recover(self, worker: str) -> None:
        rt = self.workers[worker]
        recover_worker(self.conn, rt.ctx.rq_conn, rt.ctx.scripts, worker, max_attempts=3)

    @rule(worker=st.sampled_from(["w0", "w1"]))
    def start_and_pause(self, worker: str) -> None:
        """Like SIGSTOP: the worker has started a micro-batch and holds it in memory."""
        mb = self.conn.lpop(keys.rq_queue_key(worker))
        if mb is not None:
            runtime = self.workers[worker]
            self.paused.append((worker, str(mb), start_running(runtime, str(mb))))  # what it holds in memory

    @precondition(lambda self: bool(self.paused))
    @rule()
    def resume_and_record_late(self) -> None:
        """...and resumes: whatever was recorded meanwhile must not be overwritten or counted twice."""
        worker, mb, items = self.paused.pop(0)
        before = {b: self.conn.hgetall(keys.batch_results_key(b)) for b in self.submitted}
        self.workers[worker].execution.execute_and_record(mb, items)
        for batch_id, results in before.items():
            after = self.conn.hgetall(keys.batch_results_key(batch_id))
            assert {f: after[f] for f in results} == results

    @invariant()
    def every_request_is_somewhere_and_claimed_at_most_once(self) -> None:
        claims: dict[tuple[str, int], list[str]] = {}
        for request, _ in waiting(self.conn):
            claims.setdefault((request.batch_id, request.start), []).append("ingress")
        for mb_key in self.conn.keys("gpulb:mb:*"):
            for member in (self.conn.hget(mb_key, "entries") or "").split():
                request = keys.parse_ingress_member(member)
                assert len(request.costs) == 1  # a micro-batch lists one member per request
                claims.setdefault((request.batch_id, request.start), []).append(mb_key)
        for batch_id, total in self.submitted.items():
            recorded = {int(f) for f in self.conn.hkeys(keys.batch_results_key(batch_id))}
            for index in range(total):
                where = claims.get((batch_id, index), [])
                assert len(where) <= 1, f"{batch_id}-{index} claimed twice: {where}"
                assert where or index in recorded, f"{batch_id}-{index} lost"

    @invariant()
    def counters_match_contents(self) -> None:
        waiting(self.conn)  # checks the ingress counters against its members
        for worker in self.workers:
            mbs = self.conn.smembers(keys.inflight_key(worker))
            credit = self.conn.hgetall(keys.credit_key(worker))
            tokens = sum(int(self.conn.hget(keys.microbatch_key(mb), "tokens") or 0) for mb in mbs)
            assert (int(credit.get("batches", 0)), int(credit.get("tokens", 0))) == (len(mbs), tokens)
        for batch_id, total in self.submitted.items():
            status = self.client.batch_status(batch_id)
            assert status.completed + status.failed + status.running + status.pending == total
            assert status.completed + status.failed == self.conn.hlen(keys.batch_results_key(batch_id))

    def teardown(self) -> None:
        for runtime in self.workers.values():
            runtime.engine.stop_runner()
            runtime.engine.backend.shutdown()
        self.client.close()
        self.conn.close()


def test_claim_commit_and_recovery_never_lose_or_double(redis_server: RedisServer) -> None:
    ClaimCommitMachine.server = redis_server
    machine = ClaimCommitMachine.TestCase
    machine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    machine().runTest()
