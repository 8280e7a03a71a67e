"""``gpulb up`` and ``gpulb demo``: one command starts Redis (when none answers), a balancer and workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from gpulb import keys
from gpulb.cli.redis_server import RedisServer, free_port
from gpulb.cli.stack import LocalStack, WorkerSpec

pytestmark = pytest.mark.e2e


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpulb.cli", *args]


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[str], timeout_s: float = 60) -> str:
    """The file's content once it holds ``text`` (a child's log: polled, as there is nothing to block on)."""
    deadline = time.monotonic() + timeout_s
    while text not in (content := path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, content
        time.sleep(0.1)
    return content


def state_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose XDG state home is under tmp_path: gpulb up's default data directory goes there."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}


class TestUp:
    def test_up_starts_redis_and_a_fleet_serves_a_file_and_stops_on_ctrl_c(self, tmp_path: Path) -> None:
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"  # nothing listens there: up starts a private redis-server
        log = (tmp_path / "up.log").open("w+")
        up = subprocess.Popen(
            cli("--redis-url", url, "up", "--speeds", "20000,40000"),
            stderr=log,
            stdout=log,
            text=True,
            env=state_env(tmp_path),
        )
        data_dir = tmp_path / "state" / "gpulb" / "redis" / str(port)
        try:
            started = wait_for_text(tmp_path / "up.log", "gpulb: up.", up)
            assert (
                f"gpulb: no Redis at {url}; started a private redis-server, its data (AOF) in {data_dir}, "
                "kept for the next gpulb up (--data-dir to change)\n"
            ) in started
            line = {"custom_id": "x", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "demo", "prompt": "hello gpu", "max_tokens": 2}}  # fmt: skip
            (tmp_path / "in.jsonl").write_text(json.dumps(line) + "\n")
            done = subprocess.run(
                cli("--redis-url", url, "submit", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            out = json.loads((tmp_path / "out.jsonl").read_text())
            assert out["response"]["body"]["choices"][0]["text"] == "hello gpu"
            status = subprocess.run(cli("--redis-url", url, "status", "--json"), capture_output=True, text=True)
            assert sorted(w["worker_id"] for w in json.loads(status.stdout)["workers"]) == ["gpu0", "gpu1"]
        finally:
            up.send_signal(signal.SIGINT)
            code = up.wait(60)
        assert code == 0, (tmp_path / "up.log").read_text()
        with pytest.raises(redis.ConnectionError):  # its private Redis went with it
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        assert (data_dir / "appendonlydir").is_dir()  # its data stays for the next gpulb up
        assert (tmp_path / "up.log").read_text().endswith("gpulb: stopped\n")

    def test_ctrl_c_to_the_process_group_drains_workers_before_redis_stops_and_keeps_its_data(
        self, tmp_path: Path
    ) -> None:
        """A terminal's Ctrl-C reaches the whole foreground process group: only up itself may act on it."""
        port, data_dir = free_port(), tmp_path / "data"
        url = f"redis://127.0.0.1:{port}/0"
        log = (tmp_path / "up.log").open("w+")
        # Micro-batches of 64 requests that take seconds: the workers hold work in their engines and queues.
        env = {**os.environ, "GPULB_BALANCER__BATCH_TARGET_S": "30", "GPULB_BALANCER__MAX_OUTSTANDING_BATCHES": "1"}
        up = subprocess.Popen(
            cli("--redis-url", url, "up", "--speeds", "300,300", "--data-dir", str(data_dir)),
            stderr=log,
            stdout=log,
            text=True,
            env=env,
            start_new_session=True,  # a process group of its own, as a terminal's foreground job has
        )
        try:
            started = wait_for_text(tmp_path / "up.log", "gpulb: up.", up)
            assert f"its data (AOF) in {data_dir}, kept for the next gpulb up" in started
            batch_id = submit_and_wait_until_running(url, tmp_path)
        finally:
            os.killpg(up.pid, signal.SIGINT)
            code = up.wait(90)
        output = (tmp_path / "up.log").read_text()
        assert code == 0, output
        assert output.endswith("gpulb: stopping: workers and the balancer drain, then Redis (Ctrl-C again to force)"
                               "\ngpulb: stopped\n")  # fmt: skip
        logs = Path(re.search(r"logs in (\S+)", output).group(1))  # type: ignore[union-attr]
        for name in ("gpu0", "gpu1"):
            worker_log = (logs / f"{name}.log").read_text()
            assert "lost redis" not in worker_log and "waiting for redis" not in worker_log, worker_log
            assert '"event": "worker deregistered"' in worker_log, worker_log
        with RedisServer(data_dir, appendonly=True, port=port) as server:  # the kept data, read back
            conn = redis.Redis.from_url(server.url, decode_responses=True)
            batch = conn.hgetall(keys.batch_key(batch_id))
            pending = int(conn.get(keys.ingress_requests_key("demo")) or 0)
            done = int(batch["completed"])
            assert (batch["state"], batch["running"], pending + done) == ("running", "0", 400)
            assert 0 < done < 400
            conn.close()

    def test_a_second_up_on_a_redis_where_a_stack_runs_is_refused_before_starting_anything(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path
    ) -> None:
        with LocalStack(redis_url, [WorkerSpec("gpu0", "demo"), WorkerSpec("gpu1", "demo")], tmp_path / "logs"):
            beat = conn.hgetall(keys.balancer_heartbeat_key())
            for command in ("up", "demo"):
                done = subprocess.run(cli("--redis-url", redis_url, command, "--speeds", "1000"),
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
                assert done.returncode == 1, done.stderr
                port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
                assert done.stderr == (
                    f"gpulb: error: a gpulb stack already runs on the Redis at {redis_url}: a balancer (pid "
                    f"{beat['pid']} on {beat['host']}) and workers gpu0 (demo). Use it as it is (gpulb submit, gpulb "
                    f"status), stop it first, or start this one on another Redis: gpulb --redis-url "
                    f"redis://127.0.0.1:{port + 1}/0 up\n"
                )

    def test_a_worker_whose_id_a_live_worker_holds_fails_the_start_once_with_the_reason(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        with LocalStack(redis_url, [WorkerSpec("taken", "demo")], tmp_path / "logs", balancers=0):
            done = subprocess.run(
                cli("--redis-url", redis_url, "up", "--speeds", "1000",
                    "--worker-arg=--id=taken", "--worker-arg=--load-ttl-s=1"),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert "gpulb: error: stack did not start (exited: ['gpu0']): a live worker already holds the id of gpu0; " in (
            done.stderr
        )
        assert done.stderr.count("exited") == 1

    def test_a_missing_redis_server_binary_is_a_clear_message(self, tmp_path: Path) -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"
        env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no redis-server
        done = subprocess.run(cli("--redis-url", url, "up"), capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 1
        assert "redis-server is not installed: apt-get install redis-server" in done.stderr

    def test_a_remote_redis_that_does_not_answer_is_not_replaced(self) -> None:
        done = subprocess.run(
            cli("--redis-url", "redis://no-such-host.invalid:6379/0", "up"),
            capture_output=True,
            text=True,
            env={**os.environ, "GPULB_REDIS__CONNECT_TIMEOUT_S": "0.3"},
            timeout=60,
        )
        assert done.returncode == 1 and "it is not local" in done.stderr


class TestDemo:
    def test_demo_runs_a_batch_and_prints_shares_against_speeds(self, redis_url: str) -> None:
        done = subprocess.run(cli("--redis-url", redis_url, "demo", "--requests", "300", "--speeds", "10000,30000"),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith("gpu")}
        assert set(rows) == {"gpu0", "gpu1"}
        assert rows["gpu0"][2] == "25.0%" and rows["gpu1"][2] == "75.0%"  # speed shares
        assert "300 requests (0 failed)" in done.stdout
        assert "300/300 done (100%)" in done.stderr
        for row in rows.values():  # slots busy: "NN% of 128"
            assert row[-2:] == ["of", "128"] and row[-3].endswith("%")
        assert re.search(r"Engines kept \d+% of their slots busy until the backlog ran out", done.stdout)


def submit_and_wait_until_running(url: str, tmp_path: Path) -> str:
    """Submit 400 requests and return the batch id once some are running in the workers' engines."""
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "demo", "prompt": f"p {i}", "max_tokens": 16}} for i in range(400)]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    submitted = subprocess.run(cli("--redis-url", url, "submit", str(tmp_path / "in.jsonl"), "--detach"),
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    conn = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + 60
    while int(conn.hget(keys.batch_key(batch_id), "running") or 0) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)  # polling Redis with a deadline: the batch's progress has no event to wait on here
    conn.close()
    return batch_id
