"""Faults with real processes: kill -9 loops, SIGSTOP past the TTL, Redis restarts, AUTH and TLS."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.chaos import FAST_FAILURE_ENV, run_chaos
from gpulb import keys
from gpulb.cli.redis_server import RedisServer, free_port
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client

pytestmark = pytest.mark.e2e


def read_logs(log_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))


def assert_exactly_once(client: Client, batch_id: str, total: int) -> None:
    batch = client.get_batch(batch_id)
    results = batch.results(timeout=120)
    status = batch.status()
    assert [r.index for r in results] == list(range(total))
    assert all(r.error is None for r in results)
    assert (status.completed, status.failed, status.running, status.pending) == (total, 0, 0, 0)
    assert len(client._conn.hkeys(keys.batch_results_key(batch_id))) == total  # type: ignore[arg-type]


class TestKillLoop:
    def test_twenty_kills_of_workers_and_balancers_lose_nothing(self, redis_url: str, tmp_path: Path) -> None:
        report = run_chaos(redis_url, tmp_path, kills=20, requests=1000, seed=3)
        assert report.kills == 20 and report.worker_kills > 0 and report.balancer_kills > 0
        assert (report.lost, report.recorded_twice, report.failed) == (0, 0, 0)

    def test_kills_full_redis_spells_and_garbage_lose_nothing_and_stop_no_process(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        report = run_chaos(redis_url, tmp_path, kills=20, requests=1000, seed=5, edges=True)
        assert report.full_spells > 0 and report.garbage_planted > 0
        assert (report.lost, report.recorded_twice, report.failed, report.unexpected_exits) == (0, 0, 0, 0)


class TestPausedWorker:
    def test_sigstop_past_the_ttl_then_resume_records_nothing_twice(self, redis_url: str, tmp_path: Path) -> None:
        workers = [WorkerSpec("sleepy", "m", 2000, max_batch=8), WorkerSpec("steady", "m", 2000, max_batch=8)]
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        with LocalStack(redis_url, workers, tmp_path, env=FAST_FAILURE_ENV) as stack, Client(redis_url) as client:
            batch = client.submit_batch([{"prompt": f"p{i}", "max_tokens": 40} for i in range(200)], model="m")
            while not conn.scard(keys.inflight_key("sleepy")):
                time.sleep(0.01)
            stack.procs["sleepy"].send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 20
            while conn.sismember(keys.workers_key(), "sleepy") or conn.scard(keys.inflight_key("sleepy")):
                assert time.monotonic() < deadline, "the balancer never reaped the paused worker"
                time.sleep(0.05)
            stack.procs["sleepy"].send_signal(signal.SIGCONT)
            assert_exactly_once(client, batch.id, 200)
            deadline = time.monotonic() + 10
            while not conn.exists(keys.load_key("sleepy")):  # it comes back as a worker
                assert time.monotonic() < deadline
                time.sleep(0.05)


class TestRedisRestart:
    def test_queued_requests_survive_a_restart_with_aof(self, tmp_path: Path) -> None:
        server = RedisServer(tmp_path / "data", appendonly=True)
        (tmp_path / "data").mkdir()
        server.start()
        try:
            with Client(server.url) as client:
                batch = client.submit_batch([f"p{i}" for i in range(50)], model="m")
            server.stop()
            server.start()
            with LocalStack(server.url, [WorkerSpec("w", "m", 5000)], tmp_path / "logs"), Client(server.url) as c:
                assert_exactly_once(c, batch.id, 50)
        finally:
            server.stop()

    def test_a_restart_mid_batch_is_ridden_out_by_every_process(self, tmp_path: Path) -> None:
        (tmp_path / "data").mkdir()
        server = RedisServer(tmp_path / "data", appendonly=True).start()
        workers = [WorkerSpec("a", "m", 2000, max_batch=8), WorkerSpec("b", "m", 2000, max_batch=8)]
        try:
            with LocalStack(server.url, workers, tmp_path / "logs", env=FAST_FAILURE_ENV) as stack, \
                    Client(server.url) as client:  # fmt: skip
                batch = client.submit_batch([{"prompt": f"p{i}", "max_tokens": 40} for i in range(300)], model="m")
                while batch.status().completed < 50:
                    time.sleep(0.05)
                server.stop()
                time.sleep(1.0)  # Redis is down for a second
                server.start()
                assert_exactly_once(client, batch.id, 300)
                assert all(p.poll() is None for p in stack.procs.values()), "a process died with Redis"
        finally:
            server.stop()


class TestFullRedis:
    def test_every_process_rides_out_a_full_redis_and_resumes_by_itself(self, redis_url: str, tmp_path: Path) -> None:
        """maxmemory with noeviction refuses writes and every MULTI: before, the balancer exited on its wake-up
        read and each worker quit when its load HSET failed after a RECORD."""
        workers = [WorkerSpec("a", "m", 2000, max_batch=8), WorkerSpec("b", "m", 2000, max_batch=8)]
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        with LocalStack(redis_url, workers, tmp_path, env=FAST_FAILURE_ENV) as stack, Client(redis_url) as client:
            batch = client.submit_batch([{"prompt": f"p{i}", "max_tokens": 40} for i in range(300)], model="m")
            while batch.status().completed < 50:
                time.sleep(0.05)
            conn.config_set("maxmemory", 1)  # full: nothing can be written until memory is freed
            try:
                time.sleep(4.0)  # past the workers' 1.5 s TTL: their load keys expire, the reaper cannot write
                assert all(p.poll() is None for p in stack.procs.values()), "a process exited on a full Redis"
            finally:
                conn.config_set("maxmemory", 0)
            assert_exactly_once(client, batch.id, 300)
            assert all(p.poll() is None for p in stack.procs.values()), "a process exited after a full Redis"
        assert "redis is full" in read_logs(tmp_path)


class TestSecurity:
    PASSWORD = "s3cret-Pa55"

    def test_auth_works_and_the_password_never_shows(self, tmp_path: Path) -> None:
        server = RedisServer(tmp_path, extra_args=["--requirepass", self.PASSWORD])
        server.start(client=redis.Redis(port=server.port, password=self.PASSWORD, socket_connect_timeout=0.2))
        url = f"redis://:{self.PASSWORD}@127.0.0.1:{server.port}/0"
        try:
            with LocalStack(url, [WorkerSpec("w", "m", 5000)], tmp_path / "logs") as stack, Client(url) as client:
                batch = client.submit_batch(["a", "b"], model="m")
                assert batch.results(timeout=30)[1].text.split()[0] == "b"
                status = _gpulb("status", url=url)
                status_json = _gpulb("status", "--json", url=url)
                stack.stop()
            assert status.returncode == 0 and "w " in status.stdout
            shown = status.stdout + status.stderr + status_json.stdout + read_logs(tmp_path / "logs")
            assert self.PASSWORD not in shown
            assert ":***@127.0.0.1" in status.stdout
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=server.port).ping()  # and the server really did require it
        finally:
            server.stop()

    def test_tls_with_a_ca_file(self, tls_files: dict[str, Path], tmp_path: Path) -> None:
        port = free_port()
        server = RedisServer(tmp_path, port=0, extra_args=[
            "--tls-port", str(port), "--tls-cert-file", str(tls_files["cert"]), "--tls-key-file",
            str(tls_files["key"]), "--tls-ca-cert-file", str(tls_files["ca"]), "--tls-auth-clients", "no",
        ])  # fmt: skip
        url = f"rediss://localhost:{port}/0"
        server.start(client=redis.Redis.from_url(url, ssl_ca_certs=str(tls_files["ca"]), socket_connect_timeout=0.2))
        env = {"GPULB_REDIS__SSL_CA_CERTS": str(tls_files["ca"])}
        try:
            from gpulb.settings import Settings

            settings = Settings(_env_file=None, redis_url=url, redis={"ssl_ca_certs": str(tls_files["ca"])})  # type: ignore[call-arg]
            with LocalStack(url, [WorkerSpec("w", "m", 5000)], tmp_path / "logs", env=env), \
                    Client(settings=settings) as client:  # fmt: skip
                assert len(client.submit_batch(["a", "b", "c"], model="m").results(timeout=30)) == 3
            with pytest.raises(redis.ConnectionError):
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()  # no CA: the certificate is refused
        finally:
            server.stop()


class TestMemoryBounds:
    def test_many_batches_leave_redis_memory_flat(self, redis_url: str, tmp_path: Path) -> None:
        env = {"GPULB_PRODUCER__RESULT_TTL_S": "1", "GPULB_BALANCER__JOB_RESULT_TTL_S": "1"}
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        with LocalStack(redis_url, [WorkerSpec("w", "m", 50000)], tmp_path, env=env), \
                Client(redis_url, settings=_settings(redis_url, result_ttl_s=1)) as client:  # fmt: skip

            def soak(rounds: int) -> None:
                for _ in range(rounds):
                    client.submit_batch([f"prompt {i}" * 20 for i in range(100)], model="m").wait(timeout=60)

            soak(5)
            time.sleep(2.5)  # results and RQ job records expire (TTL 1 s)
            baseline_keys, baseline_mem = conn.dbsize(), int(conn.info("memory")["used_memory"])
            soak(40)
            time.sleep(2.5)
            assert conn.keys("gpulb:batch:*") == []
            assert conn.dbsize() <= baseline_keys + 2
            assert int(conn.info("memory")["used_memory"]) < baseline_mem * 1.2


def _settings(url: str, *, result_ttl_s: int) -> object:
    from gpulb.settings import Settings

    return Settings(_env_file=None, redis_url=url, producer={"result_ttl_s": result_ttl_s})  # type: ignore[call-arg]


def _gpulb(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpulb.cli", "--redis-url", url, *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A throw-away CA and a server certificate for localhost, made with openssl."""
    d = tmp_path_factory.mktemp("tls")
    files = {"ca": d / "ca.crt", "ca_key": d / "ca.key", "key": d / "server.key", "csr": d / "server.csr",
             "cert": d / "server.crt", "ext": d / "ext.cnf"}  # fmt: skip
    files["ext"].write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gpulb-test-ca",
         "-keyout", files["ca_key"], "-out", files["ca"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", files["key"],
         "-out", files["csr"]],
        ["x509", "-req", "-in", files["csr"], "-CA", files["ca"], "-CAkey", files["ca_key"], "-CAcreateserial",
         "-days", "1", "-extfile", files["ext"], "-out", files["cert"]],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True)
    yield files
