"""The official ``openai`` client against a real ``gpulb gateway`` process, balancer and simulated workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from gpulb import keys
from gpulb.cli.redis_server import free_port
from gpulb.cli.stack import LocalStack, WorkerSpec
from gpulb.models import WorkerLoad, WorkerState

pytestmark = pytest.mark.e2e
KEY = "sk-gpulb-test"


def chat_line(i: int, model: str = "m", url: str = "/v1/chat/completions", **body: Any) -> str:
    messages = [{"role": "user", "content": f"hello {i}"}]
    return json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url,
                       "body": {"model": model, "messages": messages, "max_tokens": 2, **body}})  # fmt: skip


@contextmanager
def running_gateway(redis_url: str, log_path: Path, **settings: str) -> Iterator[str]:
    """A ``gpulb gateway`` process on a free port, with ``GPULB_GATEWAY__<NAME>`` settings; yields its URL once it
    answers."""
    port = free_port()
    env = {**os.environ, "GPULB_REDIS_URL": redis_url, "GPULB_LOG_FORMAT": "json",
           **{f"GPULB_GATEWAY__{name.upper()}": value for name, value in settings.items()}}  # fmt: skip
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gpulb.cli", "gateway", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@contextmanager
def simulated_fleet(redis_url: str, where: Path, count: int = 2) -> Iterator[None]:
    faults = ("--simulate-faults", "yes")  # a prompt with @@fail fails
    workers = [WorkerSpec(f"g{i}", "m", 50_000, args=faults) for i in range(count)]
    with LocalStack(redis_url, workers, where, env={"GPULB_WORKER__RETRY_BACKOFF_S": "0.05"}):
        yield


@contextmanager
def parked_worker(redis_url: str, model: str, worker_id: str = "parked") -> Iterator[None]:
    """A worker registered for ``model`` that is still starting (its engine loading): the model counts as served,
    so a batch for it is taken, yet nothing of it runs."""
    load = WorkerLoad(worker_id=worker_id, model=model, backend="simulated", state=WorkerState.STARTING, capacity=1)
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    conn.sadd(keys.workers_key(), worker_id)
    conn.hset(keys.load_key(worker_id), mapping=load.to_hash())  # type: ignore[arg-type]
    try:
        yield
    finally:
        conn.srem(keys.workers_key(), worker_id)
        conn.delete(keys.load_key(worker_id))
        conn.close()


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[str]:
    with (
        simulated_fleet(redis_url, tmp_path / "stack"),
        running_gateway(redis_url, tmp_path / "gateway.log", api_keys=json.dumps([KEY]), max_file_bytes="20000") as url,
    ):
        yield url


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)


def wait_final(client: openai.OpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


class TestBatchAPI:
    def test_upload_create_poll_download(self, client: openai.OpenAI, tmp_path: Path) -> None:
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(chat_line(i) for i in range(40)) + "\n")
        uploaded = client.files.create(file=source.open("rb"), purpose="batch")
        assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (source.stat().st_size, "in.jsonl", "batch")
        assert client.files.retrieve(uploaded.id).id == uploaded.id
        assert client.files.content(uploaded.id).text == source.read_text()
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"team": "search"})  # fmt: skip
        assert batch.status == "in_progress" and batch.request_counts.total == 40
        done = wait_final(client, batch.id)
        assert done.status == "completed" and done.metadata == {"team": "search"}
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (40, 40, 0)
        assert done.completed_at >= done.finalizing_at >= done.in_progress_at >= done.created_at
        assert done.error_file_id is None
        lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
        assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(40))
        body = next(line for line in lines if line["custom_id"] == "r7")["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "user: hello"
        assert client.files.delete(uploaded.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)

    def test_list_with_pagination_and_cancel(self, client: openai.OpenAI, tmp_path: Path) -> None:
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(chat_line(i) for i in range(3)) + "\n")
        file_id = client.files.create(file=source.open("rb"), purpose="batch").id
        made = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h").id for _ in range(3)]  # fmt: skip
        first = client.batches.list(limit=2)
        assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
        rest = client.batches.list(limit=2, after=first.data[-1].id)
        assert [b.id for b in rest.data] == [made[0]] and not rest.has_more
        for batch_id in made:
            final = wait_final(client, batch_id)
            assert final.status == "completed"
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status 'completed'"):
            client.batches.cancel(made[0])

    def test_cancel_before_it_runs(self, client: openai.OpenAI, redis_url: str, tmp_path: Path) -> None:
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(chat_line(i, model="parked") for i in range(5)) + "\n")
        file_id = client.files.create(file=source.open("rb"), purpose="batch").id
        with parked_worker(redis_url, "parked"):
            batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h")  # fmt: skip
            assert batch.status == "in_progress"
            cancelled = client.batches.cancel(batch.id)
        assert cancelled.status in ("cancelling", "cancelled")
        final = wait_final(client, batch.id)
        assert final.status == "cancelled" and final.output_file_id is None
        errors = [json.loads(x) for x in client.files.content(final.error_file_id).text.splitlines()]
        assert sorted(e["custom_id"] for e in errors) == [f"r{i}" for i in range(5)]
        assert all(e["error"]["code"] == "cancelled" for e in errors)

    def test_bad_lines_fail_the_batch_with_per_line_errors(self, client: openai.OpenAI, tmp_path: Path) -> None:
        source = tmp_path / "bad.jsonl"
        source.write_text(chat_line(0) + "\n{not json\n" + chat_line(2, url="/v1/completions") + "\n")
        file_id = client.files.create(file=source.open("rb"), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.errors is not None
        assert [(e.line, e.code) for e in batch.errors.data] == [(2, "invalid_request"), (3, "invalid_request")]
        assert "does not match the batch's endpoint" in (batch.errors.data[1].message or "")

    def test_documented_errors(self, client: openai.OpenAI, gateway: str, tmp_path: Path) -> None:
        for lines, refused_by in ((1000, "request of"), (200, "file of")):  # before reading the body; after
            big = tmp_path / "big.jsonl"
            big.write_text(chat_line(0) * lines)
            with pytest.raises(openai.APIStatusError) as too_big:
                client.files.create(file=big.open("rb"), purpose="batch")
            assert too_big.value.status_code == 413 and "exceeds the limit of 20,000 bytes" in str(too_big.value)
            assert refused_by in str(too_big.value)
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            client.batches.create(input_file_id="file-x", endpoint="/v1/responses", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_0000000000000000")
        anonymous = openai.OpenAI(base_url=f"{gateway}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as denied:
            anonymous.models.list()
        assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"


class TestOnline:
    def test_completions_chat_and_models(self, client: openai.OpenAI) -> None:
        assert [m.id for m in client.models.list().data] == ["m"]
        completion = client.completions.create(model="m", prompt="one two three", max_tokens=5)
        assert completion.object == "text_completion" and completion.choices[0].text == "one two three one two"
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi there"}],
                                              max_tokens=2, temperature=0)  # fmt: skip
        assert chat.choices[0].message.content == "user: hi" and chat.choices[0].finish_reason == "length"

    def test_a_failed_request_is_answered_once_and_not_resent(self, gateway: str, redis_url: str) -> None:
        import redis

        retrying = openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=2)  # the client's default
        with pytest.raises(openai.InternalServerError, match="the request failed: SimulatedFault"):
            retrying.completions.create(model="m", prompt="boom @@fail", max_tokens=1)
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        batches = [k for k in conn.keys("gpulb:batch:*") if k.count(":") == 2]
        assert len(batches) == 1  # x-should-retry: false kept the client from sending it again
        assert conn.zcard("gpulb:batches") == 0  # online requests stay out of `gpulb batch list`
        assert 0 < conn.ttl(batches[0]) <= 60  # and their results go soon

    def test_refusals(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError, match="stream_options: only allowed with stream: true"):
            client.completions.create(model="m", prompt="x", stream_options={"include_usage": True})
        with pytest.raises(openai.NotFoundError, match="no live worker serves it"):
            client.completions.create(model="nobody", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.completions.create(model="m", prompt="x", max_tokens=1, temperature=-1)


def test_without_keys_it_accepts_everything_and_says_so(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "GPULB_REDIS_URL": redis_url, "GPULB_LOG_FORMAT": "json"}
    env.pop("GPULB_GATEWAY__API_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "gpulb.cli", "gateway", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)  # no Authorization header
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert models.status_code == 200 and models.json() == {"object": "list", "data": []}
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=15)
    assert "NO API KEYS CONFIGURED" in output
