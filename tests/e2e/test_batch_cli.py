"""``gpulb submit`` and ``gpulb batch`` as subprocesses, against a live stack: OpenAI Batch files in and out."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from gpulb.cli.stack import LocalStack, WorkerSpec

pytestmark = pytest.mark.e2e


def gpulb(*args: str, redis_url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpulb.cli", "--redis-url", redis_url, *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def chat_line(i: int, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"say {i}"}]
    body = {"model": "m", "messages": messages, "max_tokens": 3, **body}
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Any:
    with LocalStack(redis_url, [WorkerSpec("g0", "m", 50_000), WorkerSpec("g1", "m", 50_000)], tmp_path / "logs") as s:
        yield s


@pytest.mark.usefixtures("stack")
class TestSubmit:
    def test_chat_file_in_openai_batch_output_out(self, redis_url: str, tmp_path: Path) -> None:
        source = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(300)])
        done = gpulb("submit", str(source), "-o", str(tmp_path / "out.jsonl"), redis_url=redis_url)
        assert done.returncode == 0, done.stderr
        out = read_jsonl(tmp_path / "out.jsonl")
        assert sorted(line["custom_id"] for line in out) == sorted(f"q{i}" for i in range(300))
        for line in out:
            i = int(line["custom_id"][1:])
            body = line["response"]["body"]
            assert line["error"] is None and line["response"]["status_code"] == 200
            assert (body["object"], body["model"]) == ("chat.completion", "m")
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": f"user: say {i}", "refusal": None}
            assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        assert "300/300 done (100%)" in done.stderr and "wrote 300 lines" in done.stderr
        assert "no live worker" not in done.stderr

    def test_completions_detach_then_wait_status_and_list(self, redis_url: str, tmp_path: Path) -> None:
        body = {"model": "m", "prompt": "a b c", "max_tokens": 2, "stop": "\n"}
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in range(20)]
        source = write_jsonl(tmp_path / "in.jsonl", lines)
        detached = gpulb("submit", str(source), "--detach", "--metadata", "team=search", redis_url=redis_url)
        assert detached.returncode == 0, detached.stderr
        batch_id = detached.stdout.strip()
        assert len(batch_id) == 16 and f"gpulb batch wait {batch_id}" in detached.stderr
        waited = gpulb("batch", "wait", batch_id, "-o", str(tmp_path / "out.jsonl"), redis_url=redis_url)
        assert waited.returncode == 0, waited.stderr
        out = {line["custom_id"]: line for line in read_jsonl(tmp_path / "out.jsonl")}
        assert set(out) == {f"c{i}" for i in range(20)}
        assert out["c7"]["response"]["body"]["choices"][0]["text"] == "a b"
        assert out["c7"]["response"]["body"]["object"] == "text_completion"
        status = json.loads(gpulb("batch", "status", batch_id, "--json", redis_url=redis_url).stdout)
        assert (status["state"], status["completed"], status["total"]) == ("completed", 20, 20)
        assert status["metadata"] == {"input_file": "in.jsonl", "endpoint": "/v1/completions", "team": "search"}
        listed = gpulb("batch", "list", redis_url=redis_url)
        assert batch_id in listed.stdout and "20/20 done (100%)" in listed.stdout

    def test_progress_bar_on_a_terminal(self, redis_url: str, tmp_path: Path) -> None:
        source = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(50)])
        pid, fd = pty.fork()
        if pid == 0:  # the child: gpulb with a terminal as stdout and stderr
            os.execv(sys.executable, [sys.executable, "-m", "gpulb.cli", "--redis-url", redis_url, "submit",
                                      str(source), "-o", str(tmp_path / "out.jsonl")])  # fmt: skip
        screen = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
        _, code = os.waitpid(pid, 0)
        text = screen.decode()
        assert os.waitstatus_to_exitcode(code) == 0, text
        assert "\r\x1b[2K[" in text and "█" * 28 in text and "50/50 done (100%)" in text
        assert len(read_jsonl(tmp_path / "out.jsonl")) == 50


class TestWithoutWorkers:
    def test_cancel_writes_cancelled_lines(self, redis_url: str, tmp_path: Path) -> None:
        source = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
        batch_id = gpulb("submit", str(source), "--detach", redis_url=redis_url).stdout.strip()
        cancelled = gpulb("batch", "cancel", batch_id, "--json", redis_url=redis_url)
        assert json.loads(cancelled.stdout)["cancelled"] == 5
        gpulb("batch", "results", batch_id, "-o", str(tmp_path / "out.jsonl"), redis_url=redis_url)
        out = read_jsonl(tmp_path / "out.jsonl")
        assert [line["custom_id"] for line in out] == [f"q{i}" for i in range(5)]
        assert all(line["response"] is None and line["error"]["code"] == "cancelled" for line in out)

    def test_bad_lines_are_reported_by_number_and_nothing_is_enqueued(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path
    ) -> None:
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps(chat_line(0)) + "\n{oops\n" + json.dumps(chat_line(2, temperature=-1)) + "\n")
        done = gpulb("submit", str(source), redis_url=redis_url)
        assert done.returncode == 1
        assert "2 bad line(s), nothing was submitted" in done.stderr
        assert "line 2: not JSON" in done.stderr
        assert "line 3: body.temperature: Input should be greater than or equal to 0" in done.stderr
        assert conn.keys("gpulb:*") == []

    @pytest.mark.parametrize(
        ("bad_line", "message"),
        [
            ('{"custom_id": "q", "body": {"max_tokens": ' + "9" * 5000 + "}}",
             "not JSON gpulb accepts: a number over 4,300 digits"),
            ("[" * 100_000 + "]" * 100_000, "not JSON gpulb accepts: nested too deeply"),
            (json.dumps(chat_line(1)).replace("say 1", "say \\ud800"),
             "messages.0.content: '\\ud800' at character 4 is a lone surrogate"),
            (json.dumps(chat_line(1, stop="\\udfff")).replace("\\\\udfff", "\\udfff"),
             "stop.0: '\\udfff' at character 0 is a lone surrogate"),
            (json.dumps(chat_line(1, model="m\n")), "model: 'm\\n' is not a valid model name"),
        ],
    )  # fmt: skip
    def test_a_line_python_cannot_take_is_one_clear_error_not_a_traceback(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path, bad_line: str, message: str
    ) -> None:
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps(chat_line(0)) + "\n" + bad_line + "\n")
        done = gpulb("submit", str(source), redis_url=redis_url)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        summary, reported = done.stderr.splitlines()
        assert summary == f"gpulb: error: {source}: 1 bad line(s), nothing was submitted:"
        assert reported.startswith(f"  line 2: {message}")
        assert conn.keys("*") == []

    def test_results_of_an_unfinished_batch_fail_at_once_with_its_state_and_point_to_wait(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        source = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
        batch_id = gpulb("submit", str(source), "--detach", redis_url=redis_url).stdout.strip()
        output = tmp_path / "out.jsonl"
        done = gpulb("batch", "results", batch_id, "-o", str(output), redis_url=redis_url)
        assert done.returncode == 1
        assert done.stderr == (
            f"gpulb: error: batch {batch_id} is pending (5 pending, 0 running, 0/5 done (0%)): not every result is "
            f"in yet. Wait for it and write the file: gpulb batch wait {batch_id} -o {output}\n"
        )
        assert not output.exists()

    def test_results_with_a_timeout_say_what_they_wait_for(self, redis_url: str, tmp_path: Path) -> None:
        source = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
        batch_id = gpulb("submit", str(source), "--detach", redis_url=redis_url).stdout.strip()
        done = gpulb("batch", "results", batch_id, "-o", str(tmp_path / "out.jsonl"), "--timeout", "0.2",
                     redis_url=redis_url)  # fmt: skip
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"gpulb: waiting up to 0.2 s for batch {batch_id} to finish (5 pending, 0 running, 0/5 done (0%))",
            f"gpulb: error: batch {batch_id} not finished after 0.2 s (0/5 done (0%)); it keeps running: "
            f"gpulb batch wait {batch_id}",
        ]

    def test_submit_warns_while_no_live_worker_serves_the_model(self, redis_url: str, tmp_path: Path) -> None:
        source = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
        done = gpulb("submit", str(source), "--timeout", "0.2", redis_url=redis_url)
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        batch_id = lines[1].split()[2].rstrip(":")
        assert lines == [
            "gpulb: warning: no live worker serves model 'm': the batch waits until one does (start one: gpulb "
            "worker --model m (or gpulb up --model m); --fail-fast: refuse instead)",
            f"gpulb: batch {batch_id}: 3 requests for m",
            f"batch {batch_id}: 0/3 done (0%) · 0 req/s · warning: no live worker serves model 'm'",
            f"gpulb: error: batch {batch_id} not finished after 0.2 s (0/3 done (0%)); it keeps running: "
            f"gpulb batch wait {batch_id}",
        ]

    def test_fail_fast_submits_nothing_when_no_live_worker_serves_the_model(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path
    ) -> None:
        source = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
        done = gpulb("submit", str(source), "--fail-fast", redis_url=redis_url)
        assert done.returncode == 1
        assert done.stderr == (
            "gpulb: error: no live worker serves model 'm'; nothing was submitted (start one: gpulb worker --model m "
            "(or gpulb up --model m))\n"
        )
        assert conn.keys("*") == []

    def test_unknown_batch_is_a_clear_error(self, redis_url: str) -> None:
        done = gpulb("batch", "status", "0123456789abcdef", redis_url=redis_url)
        assert done.returncode == 1 and "batch 0123456789abcdef not found" in done.stderr
