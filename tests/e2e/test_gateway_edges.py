"""The gateway's edges over real HTTP: tenants per API key, bearer keys only, size caps while a body streams in,
slow clients cut off, malformed ids answered 404. A real ``gpulb gateway`` process and a real redis-server."""

from __future__ import annotations

import json
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from gpulb import keys
from tests.e2e.test_gateway import chat_line, parked_worker, running_gateway, simulated_fleet, wait_final

pytestmark = pytest.mark.e2e
KEY_A, KEY_B, ADMIN = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210", "sk-admin-55555"
MAX_FILE, MAX_JSON = 20_000, 50_000
ENFORCED_FILE = MAX_FILE + 64 * 1024  # the multipart slack around the file


@pytest.fixture
def keyed(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """Users A and B, one admin, a worker serving model m, and one for model parked that never takes work."""
    with simulated_fleet(redis_url, tmp_path / "stack", count=1), parked_worker(redis_url, "parked"), running_gateway(
        redis_url, tmp_path / "gateway.log", api_keys=json.dumps([KEY_A, KEY_B]), admin_api_keys=json.dumps([ADMIN]),
        max_file_bytes=str(MAX_FILE), max_json_bytes=str(MAX_JSON),
    ) as url:  # fmt: skip
        yield url


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def upload(c: openai.OpenAI, tmp_path: Path, model: str = "m", count: int = 2) -> str:
    source = tmp_path / f"in-{time.monotonic_ns()}.jsonl"
    source.write_text("\n".join(chat_line(i, model=model) for i in range(count)) + "\n")
    return c.files.create(file=source.open("rb"), purpose="batch").id


def create_batch(c: openai.OpenAI, file_id: str) -> str:
    return c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id


def not_found(kind: str, object_id: str) -> dict[str, Any]:
    message = f"No such {kind} object: {object_id}"
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "not_found"}}


def is_openai_error(response: httpx.Response, status: int) -> bool:
    try:
        error = response.json().get("error")
    except ValueError:  # not JSON: a plain-text 500, for one
        return False
    return response.status_code == status and isinstance(error, dict) and set(error) == {"message", "type", "param",
                                                                                          "code"}  # fmt: skip


class TestTenants:
    def test_a_key_sees_only_its_own_files_and_batches(self, keyed: str, tmp_path: Path) -> None:
        a, b, admin = client(keyed, KEY_A), client(keyed, KEY_B), client(keyed, ADMIN)
        file_a, idle_file = upload(a, tmp_path), upload(a, tmp_path, model="parked")
        done = wait_final(a, create_batch(a, file_a))
        idle = create_batch(a, idle_file)  # its worker never takes work: it stays in progress
        assert done.status == "completed" and done.output_file_id
        b_http = httpx.Client(base_url=keyed, headers={"Authorization": f"Bearer {KEY_B}"})
        assert b.files.list().data == [] and b.batches.list().data == []
        for file_id in (file_a, done.output_file_id, "file-000000000000000000000000"):  # A's answer as a missing one
            for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
                answer = b_http.request(method, f"/v1/files/{file_id}{path}")
                assert (answer.status_code, answer.json()) == (404, not_found("File", file_id)), (method, path)
        for batch_id in (done.id, idle, "batch_0000000000000000"):
            for method, path in (("GET", ""), ("POST", "/cancel")):
                answer = b_http.request(method, f"/v1/batches/{batch_id}{path}")
                assert (answer.status_code, answer.json()) == (404, not_found("Batch", batch_id)), (method, path)
            answer = b_http.get("/v1/batches", params={"after": batch_id})
            assert (answer.status_code, answer.json()) == (404, not_found("Batch", batch_id))
        with pytest.raises(openai.NotFoundError, match=f"No such File object: {file_a}"):
            create_batch(b, file_a)  # nor can B run A's file
        assert a.files.retrieve(file_a).id == file_a and a.batches.retrieve(idle).status == "in_progress"
        assert {f.id for f in a.files.list().data} == {file_a, idle_file, done.output_file_id}
        assert [x.id for x in a.batches.list().data] == [idle, done.id]
        own = upload(b, tmp_path)
        assert [f.id for f in b.files.list().data] == [own] and a.files.list().data[0].id != own
        assert {f.id for f in admin.files.list().data} == {file_a, idle_file, done.output_file_id, own}
        assert [x.id for x in admin.batches.list().data] == [idle, done.id]
        assert admin.files.content(done.output_file_id).text == a.files.content(done.output_file_id).text
        assert admin.batches.cancel(idle).status in ("cancelling", "cancelled")

    def test_keys_are_stored_and_logged_nowhere(self, keyed: str, redis_url: str, tmp_path: Path) -> None:
        a = client(keyed, KEY_A)
        wait_final(a, create_batch(a, upload(a, tmp_path)))
        conn = redis.Redis.from_url(redis_url)  # bytes: RQ's job data is compressed
        names: list[bytes] = conn.keys("*")  # type: ignore[assignment]
        stored = "\n".join([repr(n) for n in names] + [everything_in(conn, name) for name in names])
        assert "gpulb:gw:tenant:" in stored and all(k not in stored for k in (KEY_A, KEY_B, ADMIN))
        log = (tmp_path / "gateway.log").read_text()
        assert "gateway listening" in log and all(k not in log for k in (KEY_A, KEY_B, ADMIN))


def everything_in(conn: redis.Redis, name: bytes) -> str:
    """Every value under a key, as text (ids, fields, JSON, file contents)."""
    kind = conn.type(name).decode()  # type: ignore[union-attr]
    readers: dict[str, Callable[[], Any]] = {
        "string": lambda: [conn.get(name)], "hash": lambda: [*conn.hgetall(name).items()],
        "zset": lambda: conn.zrange(name, 0, -1), "set": lambda: conn.smembers(name),
        "list": lambda: conn.lrange(name, 0, -1),
    }  # fmt: skip
    return repr(readers.get(kind, list)())


def test_without_keys_everyone_is_one_tenant(redis_url: str, tmp_path: Path) -> None:
    with running_gateway(redis_url, tmp_path / "gateway.log") as url:
        file_id = upload(client(url, "anything"), tmp_path)
        assert [f.id for f in client(url, "something-else").files.list().data] == [file_id]
        assert httpx.get(f"{url}/v1/files/{file_id}").json()["id"] == file_id  # no Authorization at all


class TestAuthorization:
    def test_only_a_bearer_key_is_accepted(self, keyed: str) -> None:
        for header in (KEY_A, f"Basic {KEY_A}", f"Bearer{KEY_A}", "Bearer", f"Bearer {KEY_A}x", f"Token {ADMIN}"):
            answer = httpx.get(f"{keyed}/v1/files", headers={"Authorization": header})
            assert is_openai_error(answer, 401) and answer.json()["error"]["code"] == "invalid_api_key", header
        for header in (f"Bearer {KEY_A}", f"bearer {KEY_A}", f"BEARER   {KEY_A}", f"Bearer {ADMIN}"):
            assert httpx.get(f"{keyed}/v1/files", headers={"Authorization": header}).status_code == 200, header


def raw_exchange(url: str, head: bytes, body: bytes, piece: int = 4096, timeout_s: float = 10.0) -> bytes:
    """Send ``head`` then ``body`` in chunked pieces, never the last chunk, stopping once the server answers;
    return what the server sent before it closed the connection (or before ``timeout_s``)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head)
        for start in range(0, len(body), piece):
            if select.select([sock], [], [], 0)[0]:  # an answer came: stop sending
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(body[start : start + piece]), body[start : start + piece]))
            except OSError:
                break
            time.sleep(0.002)
        return read_until_closed(sock, time.monotonic() + timeout_s)


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    received = b""
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0]:
            break
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        received += data
    return received


def chunked_head(path: str, content_type: str, key: str = KEY_A) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip


def error_of(answer: bytes) -> tuple[int, dict[str, Any]]:
    """Status and error of an answer the guard cut short: the connection closed, the request id named."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    assert re.search(rb"\r\nx-request-id: req_[0-9a-f]{32}(\r\n|$)", head.lower()), head
    return int(head.split()[1]), json.loads(body)["error"]


class TestBodyLimits:
    def test_a_chunked_upload_is_cut_off_at_the_limit(self, keyed: str) -> None:
        part_head = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\n'
                     b'Content-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n')  # fmt: skip
        body = part_head + b"x" * (20 * ENFORCED_FILE)  # no end: only the gateway can end this exchange
        answer = raw_exchange(keyed, chunked_head("/v1/files", "multipart/form-data; boundary=b"), body)
        status, error = error_of(answer)
        assert status == 413 and error["code"] == "file_too_large"
        assert f"exceeds the limit of {MAX_FILE:,} bytes (GPULB_GATEWAY__MAX_FILE_BYTES)" in error["message"]

    def test_a_json_body_is_capped_while_it_streams_and_by_its_length(self, keyed: str) -> None:
        body = b'{"model": "m", "prompt": "' + b"x" * (20 * MAX_JSON)
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/batches"):
            status, error = error_of(raw_exchange(keyed, chunked_head(path, "application/json"), body))
            assert status == 413 and error["code"] == "file_too_large", path
            assert f"exceeds the limit of {MAX_JSON:,} bytes (GPULB_GATEWAY__MAX_JSON_BYTES)" in error["message"]
        declared = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {MAX_JSON + 1}\r\n\r\n").encode()  # fmt: skip
        host, port = keyed.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(declared)  # and not a byte of the body: refused on its declared length alone
            status, error = error_of(read_until_closed(sock, time.monotonic() + 10))
        assert status == 413 and f"request of {MAX_JSON + 1:,} bytes exceeds" in error["message"]
        small = httpx.post(f"{keyed}/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                           json={"model": "m", "prompt": "x " * 1000, "max_tokens": 1}, timeout=30)  # fmt: skip
        assert small.status_code == 200


@pytest.fixture
def impatient(redis_url: str, tmp_path: Path) -> Iterator[str]:
    with running_gateway(redis_url, tmp_path / "gateway.log", api_keys=json.dumps([KEY_A]),
                         header_timeout_s="1", body_timeout_s="1") as url:  # fmt: skip
        yield url


class SlowClient:
    """One connection that sends ``opening`` at once, then one byte of ``trickle`` every round."""

    def __init__(self, url: str, opening: bytes, trickle: bytes) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(opening)
        self.trickle, self.received = trickle, b""
        self.closed_after_s: float | None = None
        self.started = time.monotonic()

    def round(self) -> None:
        if self.closed_after_s is not None:
            return
        try:
            if select.select([self.sock], [], [], 0)[0]:
                data = self.sock.recv(65536)
                self.received += data
                if not data:
                    raise ConnectionResetError
            if self.trickle:
                self.sock.send(self.trickle[:1])
                self.trickle = self.trickle[1:]
        except OSError:
            self.closed_after_s = time.monotonic() - self.started
            self.sock.close()


class TestSlowClients:
    def test_connections_that_do_not_finish_in_time_are_closed(self, impatient: str) -> None:
        auth = f"Authorization: Bearer {KEY_A}\r\n"
        head = f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
        post = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000\r\n\r\n".encode()
        clients = (
            [SlowClient(impatient, b"", b"") for _ in range(5)]  # silent
            + [SlowClient(impatient, b"", head * 10) for _ in range(5)]  # a head, a byte at a time
            + [SlowClient(impatient, post, b"{" + b" " * 999) for _ in range(5)]  # a body, a byte at a time
            + [SlowClient(impatient, head, head * 10) for _ in range(2)]  # one request, then a slow second head
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(c.closed_after_s is None for c in clients):
            for c in clients:
                c.round()
            time.sleep(0.1)
        closed = [c.closed_after_s for c in clients]
        assert all(t is not None and 0.5 < t < 6 for t in closed), closed
        for c in clients[10:15]:
            status, error = error_of(c.received)
            assert status == 408 and "GPULB_GATEWAY__BODY_TIMEOUT_S" in error["message"]
        assert all(c.received.startswith(b"HTTP/1.1 200") for c in clients[15:])
        assert httpx.get(f"{impatient}/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200


class TestMalformedIds:
    def test_every_malformed_id_is_a_404_in_the_openai_shape(self, keyed: str, redis_url: str, tmp_path: Path) -> None:
        a = client(keyed, KEY_A)
        file_id = upload(a, tmp_path, model="parked")
        batch_id = create_batch(a, file_id)
        redis.Redis.from_url(redis_url).set(keys.gateway_finalize_lock_key(batch_id), "1")  # as after finalizing
        http = httpx.Client(base_url=keyed, headers={"Authorization": f"Bearer {KEY_A}"})
        bad_batches = [f"{batch_id}:finalizing", f"{batch_id}:x", "batch_" + "0" * 300, "batch_%C3%A4", "x", "%00"]
        bad_files = [f"{file_id}:x", "file-" + "0" * 300, "file-%C3%A4", "x:y", "%00"]
        for bad in bad_batches:
            assert is_openai_error(http.get(f"/v1/batches/{bad}"), 404), bad
            assert is_openai_error(http.post(f"/v1/batches/{bad}/cancel"), 404), bad
            assert is_openai_error(http.get("/v1/batches", params={"after": bad.replace("%", "")}), 404), bad
        for bad in bad_files:
            for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
                assert is_openai_error(http.request(method, f"/v1/files/{bad}{path}"), 404), (bad, method, path)
            created = http.post("/v1/batches", json={"input_file_id": bad, "endpoint": "/v1/chat/completions"})
            assert is_openai_error(created, 404), bad
        assert is_openai_error(http.get("/v1/nothing/here"), 404)
        assert a.batches.retrieve(batch_id).status == "in_progress" and a.files.retrieve(file_id).id == file_id
