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

from gpulb.redis_server import free_port

pytestmark = pytest.mark.e2e


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpulb.cli", *args]


class TestUp:
    def test_up_starts_redis_and_a_fleet_serves_a_file_and_stops_on_ctrl_c(self, tmp_path: Path) -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: up starts a private redis-server
        log = (tmp_path / "up.log").open("w+")
        up = subprocess.Popen(
            cli("--redis-url", url, "up", "--speeds", "20000,40000"), stderr=log, stdout=log, text=True
        )
        try:
            deadline = time.monotonic() + 60
            while "gpulb: up." not in (tmp_path / "up.log").read_text():
                assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
                time.sleep(0.1)
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
