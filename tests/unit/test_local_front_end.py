"""The pieces of ``gpulb up`` and ``gpulb submit`` that need no running stack: restarts, served models, progress."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import fakeredis
import pytest

from gpulb import keys
from gpulb.cli.local import _restart_dead, default_data_dir
from gpulb.cli.progress import ProgressReporter
from gpulb.cli.stack import WORKER_ID_IN_USE_EXIT, LocalStack, WorkerSpec
from gpulb.models import BatchState, BatchStatus
from gpulb.records import read_served_models


def exited(code: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    proc.wait()
    return proc


class TestRestarts:
    def test_a_worker_whose_id_is_in_use_is_not_restarted_and_says_why_once(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        stack = LocalStack("redis://127.0.0.1:1/0", [WorkerSpec("gpu0", "demo"), WorkerSpec("gpu1", "demo")], tmp_path)
        stack.procs = {"gpu0": exited(WORKER_ID_IN_USE_EXIT), "gpu1": exited(1)}
        restarted: list[str] = []
        monkeypatch.setattr(stack, "restart", lambda name: restarted.append(name) or exited(0))
        given_up: set[str] = set()
        _restart_dead(stack, given_up)
        stack.procs["gpu1"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            _restart_dead(stack, given_up)
        finally:
            stack.procs["gpu1"].kill()
            stack.procs["gpu1"].wait()
        assert restarted == ["gpu1"] and given_up == {"gpu0"}
        assert capsys.readouterr().err == (
            "gpulb: gpu0 exited: a live worker elsewhere holds the id 'gpu0' (another stack on this Redis?); "
            "not starting it again\ngpulb: gpu1 exited with 1; starting it again\n"
        )


class TestDataDir:
    def test_the_default_is_under_the_xdg_state_home_one_directory_a_port(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("XDG_STATE_HOME", "/var/state")
        assert default_data_dir(6380) == Path("/var/state/gpulb/redis/6380")
        monkeypatch.delenv("XDG_STATE_HOME")
        assert default_data_dir(6379) == Path.home() / ".local/state/gpulb/redis/6379"


class TestServedModels:
    def test_only_models_of_live_workers_that_are_not_draining(self) -> None:
        conn = fakeredis.FakeRedis(decode_responses=True)
        conn.sadd(keys.workers_key(), "a", "b", "c", "gone")
        conn.hset(keys.load_key("a"), mapping={"model": "m1", "state": "busy"})
        conn.hset(keys.load_key("b"), mapping={"model": "m2", "state": "draining"})
        conn.hset(keys.load_key("c"), mapping={"model": "m3", "state": "starting"})
        assert read_served_models(conn) == ["m1", "m3"]


class TestProgressNote:
    def test_a_note_is_shown_at_once_when_it_appears_and_goes_when_it_clears(self) -> None:
        stream = io.StringIO()
        reporter = ProgressReporter(stream, tty=False, line_every_s=60)
        status = BatchStatus(batch_id="b1", model="m", total=4, pending=4, running=0, completed=0, failed=0,
                             state=BatchState.PENDING, submitted_at=0.0)  # fmt: skip
        reporter.update(status)
        reporter.update(status, note="warning: no live worker serves model 'm'")
        reporter.update(status, note="warning: no live worker serves model 'm'")
        reporter.update(status)
        assert stream.getvalue().splitlines() == [
            "batch b1: 0/4 done (0%) · 0 req/s",
            "batch b1: 0/4 done (0%) · 0 req/s · warning: no live worker serves model 'm'",
            "batch b1: 0/4 done (0%) · 0 req/s",
        ]
