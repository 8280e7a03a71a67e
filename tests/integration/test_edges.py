"""The edges of Redis, against a real redis-server: a full Redis, scripts that would fail half-way, garbage.

Each test plants what an adversary (or a bug, or a full disk) leaves in Redis, then checks that nothing of
anybody else's is lost, that counters match what they count, and that no process stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from gpulb import keys
from gpulb.errors import BrokerFull, GarbageInRedis, InvalidRequest
from producer import Client
from tests.conftest import make_settings, waiting
from tests.integration.conftest import StartWorker, balancer, start_running, work
from tests.integration.test_reliability import kill, queued_ids

SETTLED_CREDIT = {"batches": "0", "tokens": "0", "requests": "0"}


def stat(conn: redis.Redis, field: str) -> int:
    return int(conn.hget(keys.stats_key(), field) or 0)


@pytest.fixture
def full_redis(conn: redis.Redis) -> Iterator[None]:
    """maxmemory just above what is used now (noeviction, as the test server and the compose file run)."""
    conn.config_set("maxmemory", int(conn.info("memory")["used_memory"]) + 200_000)
    yield
    conn.config_set("maxmemory", 0)


class TestFullRedis:
    def test_a_batch_too_big_for_the_memory_left_is_refused_whole_and_its_staging_removed(
        self, redis_url: str, conn: redis.Redis, full_redis: None
    ) -> None:
        small_chunks = make_settings(redis_url, producer={"chunk_size": 5})
        with Client(settings=small_chunks) as client, pytest.raises(BrokerFull, match=r"is full .*nothing was written"):
            client.submit_batch(["x" * 10_000] * 100, model="m")  # 1 MB, staged 50 KB at a time
        assert conn.keys("gpulb:batch:*") == []
        assert not conn.exists(keys.ingress_key("m"))

    def test_the_balancer_rides_out_a_full_redis_and_resumes(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w")
        batch = client.submit_batch([f"p{i}" for i in range(4)], model="m")
        conn.config_set("maxmemory", 1)  # every write refused, and every MULTI, reads included
        b = balancer(conn)
        loop = threading.Thread(target=b.run, daemon=True)
        try:
            loop.start()  # before: OutOfMemoryError from the wake-up read ended the balancer
            time.sleep(1.0)
            assert loop.is_alive() and b.dispatched_requests == 0
        finally:
            conn.config_set("maxmemory", 0)
        deadline = time.monotonic() + 10
        while b.dispatched_requests < 4:  # by itself, once memory is back
            assert loop.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        b.stop()
        loop.join(timeout=5)
        work(w, redis_url)
        assert [r.ok for r in batch.results(timeout=10)] == [True] * 4


class TestScriptsNeverStopHalfWay:
    def test_a_batch_record_holding_garbage_loses_nothing_of_the_other_batch_in_its_micro_batch(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w")
        spoiled = client.submit_batch(["a0", "a1"], model="m")
        innocent = client.submit_batch(["b0", "b1", "b2"], model="m")
        conn.hset(keys.batch_key(spoiled.id), "ttl_s", "1.5")  # EXPIRE refuses it: RECORD failed after writing
        assert balancer(conn).dispatch_round() == 5
        assert len(queued_ids(conn, "w")) == 1  # one micro-batch holds both batches
        work(w, redis_url)
        assert [r.ok for r in innocent.results(timeout=10)] == [True] * 3
        status = innocent.status()
        assert (status.completed, status.running, status.pending) == (3, 0, 0)
        assert conn.hlen(keys.batch_results_key(spoiled.id)) == 2  # its results are kept, its record left alone
        w.engine.finish_in_flight(timeout_s=10)
        assert conn.hgetall(keys.credit_key("w")) == SETTLED_CREDIT
        assert conn.scard(keys.inflight_key("w")) == 0
        assert stat(conn, "garbage_keys") >= 1

    def test_a_result_ttl_that_expire_cannot_take_is_refused_at_submit(self, client: Client, conn: redis.Redis) -> None:
        for ttl in (1.5, "7d", 0, True):
            with pytest.raises(InvalidRequest, match="result_ttl_s"):
                client.submit_batch(["a"], model="m", result_ttl_s=ttl)  # type: ignore[arg-type]
        assert conn.keys("*") == []

    def test_dead_letters_of_a_batch_with_a_garbage_total_do_not_stop_the_balancer_or_strand_others(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        dead = start_worker("dead", max_batch=8)
        spoiled = client.submit_batch(["a0", "a1"], model="m")
        innocent = client.submit_batch(["b0", "b1", "b2"], model="m")
        conn.hset(keys.batch_key(spoiled.id), "total", "many")
        assert balancer(conn).dispatch_round() == 5
        (microbatch_id,) = queued_ids(conn, "dead")
        conn.lmove(keys.rq_queue_key("dead"), keys.rq_intermediate_key("dead"))
        start_running(dead, microbatch_id)
        dead.engine.stop_runner()
        kill(conn, "dead")
        assert balancer(conn, make_settings(redis_url), max_attempts=1).dispatch_round() == 0  # reaps, no raise
        status = innocent.status()
        assert (status.failed, status.running, status.state.value) == (3, 0, "completed")
        assert conn.hlen(keys.batch_results_key(spoiled.id)) == 2
        assert conn.hgetall(keys.credit_key("dead")) == SETTLED_CREDIT
        assert waiting(conn) == []

    @pytest.mark.parametrize("counter", ["9223372036854775807", "-9223372036854775808", "lots"])
    def test_an_ingress_counter_out_of_range_is_counted_again_not_overflowed(
        self, counter: str, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        dead = start_worker("dead", max_batch=8)
        client.submit_batch([{"prompt": f"p{i}", "max_tokens": 10} for i in range(4)], model="m")
        conn.set(keys.ingress_tokens_key("m"), counter)
        assert balancer(conn).dispatch_round() == 4  # DISPATCH: DECRBY on it
        conn.set(keys.ingress_tokens_key("m"), counter)
        dead.engine.stop_runner()
        kill(conn, "dead")
        assert balancer(conn).dispatch_round() == 0  # REQUEUE: INCRBY on it
        assert len(waiting(conn)) == 4  # and both counters match what the ingress holds


class TestGarbageInRedis:
    def test_a_string_at_a_workers_load_key_is_skipped_and_counted(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        good = start_worker("good")
        conn.sadd(keys.workers_key(), "evil")
        conn.set(keys.load_key("evil"), "not a hash")
        batch = client.submit_batch([f"p{i}" for i in range(3)], model="m")
        assert balancer(conn).dispatch_round() == 3
        work(good, redis_url)
        assert [r.worker for r in batch.results(timeout=10)] == ["good"] * 3
        assert stat(conn, "malformed_load_keys") >= 1

    def test_a_string_at_a_workers_credit_key_keeps_work_away_from_it(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        start_worker("spoiled")
        good = start_worker("good")
        conn.delete(keys.credit_key("spoiled"))
        conn.set(keys.credit_key("spoiled"), "not a hash")
        batch = client.submit_batch([f"p{i}" for i in range(6)], model="m")
        while balancer(conn).dispatch_round():
            work(good, redis_url)
        assert {r.worker for r in batch.results(timeout=10)} == {"good"}
        assert conn.get(keys.credit_key("spoiled")) == "not a hash"

    def test_a_string_at_the_wake_up_list_is_replaced_and_nothing_stops(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w")
        conn.set(keys.wakeup_key(), "not a list")
        batch = client.submit_batch([f"p{i}" for i in range(3)], model="m")  # its wake-up token goes in anyway
        assert balancer(conn).dispatch_round() == 3
        conn.delete(keys.wakeup_key())
        conn.set(keys.wakeup_key(), "not a list")  # and again, for the worker's RECORD
        work(w, redis_url)
        assert [r.ok for r in batch.results(timeout=10)] == [True] * 3
        assert conn.type(keys.wakeup_key()) in ("list", "none")

    def test_an_ingress_member_whose_index_lua_would_write_as_a_float_is_dropped(
        self, client: Client, conn: redis.Redis, redis_url: str, start_worker: StartWorker
    ) -> None:
        w = start_worker("w")
        batch = client.submit_batch([f"p{i}" for i in range(3)], model="m")
        conn.zadd(keys.ingress_key("m"), {"abababababababab:123456789012345:0::5": -1})  # at the front
        assert balancer(conn).dispatch_round() == 3
        work(w, redis_url)
        assert [r.ok for r in batch.results(timeout=10)] == [True] * 3
        assert stat(conn, "dropped_ingress_members") == 1
        w.engine.finish_in_flight(timeout_s=10)
        assert conn.hgetall(keys.credit_key("w")) == SETTLED_CREDIT


class TestPublishIsAllOrNothing:
    def test_a_batch_refused_half_way_is_not_visible_at_all(self, client: Client, conn: redis.Redis) -> None:
        conn.rpush(keys.batches_key(), "not a sorted set")  # the batch index: its ZADD fails at run time
        with pytest.raises(GarbageInRedis, match=r"gpulb did not write.*nothing was written"):
            client.submit_batch(["a", "b"], model="m")
        assert conn.keys("gpulb:batch:*") == []
        assert not conn.exists(keys.ingress_key("m"))
        assert not conn.exists(keys.ingress_tokens_key("m"))
