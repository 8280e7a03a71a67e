"""The gateway against the OpenAI API's contract, through the official client (and raw HTTP where the client hides
the detail): the error shape and its ``param``, request ids, model retrieval, file listing with cursors, expiry
policies, metadata limits, and a batch for a model no worker serves."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from gpulb import keys
from gpulb.cli.stack import LocalStack, WorkerSpec
from tests.e2e.test_gateway import KEY, chat_line, parked_worker, running_gateway, simulated_fleet, wait_final
from tests.fake_openai_server import FakeOpenAIServer

pytestmark = pytest.mark.e2e
MAX_JSON = 50_000
FILE_TTL_S = 86_400  # shorter than OpenAI's 30 days: an expiry policy may not outlast it
SLASHED_MODEL = "org/parked-model"
REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """One worker serving m, one for a model whose name holds a '/', and a gateway that keeps files for a day."""
    with (
        simulated_fleet(redis_url, tmp_path / "stack", count=1),
        parked_worker(redis_url, SLASHED_MODEL),
        running_gateway(
            redis_url,
            tmp_path / "gateway.log",
            api_keys=json.dumps([KEY]),
            max_file_bytes="20000",
            max_json_bytes=str(MAX_JSON),
            file_ttl_s=str(FILE_TTL_S),
        ) as url,  # fmt: skip
    ):
        yield url


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def http(gateway: str) -> httpx.Client:
    return httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    yield conn
    conn.close()


def upload(client: openai.OpenAI, tmp_path: Path, model: str = "m", **options: Any) -> Any:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(chat_line(i, model=model) for i in range(2)) + "\n")
    return client.files.create(file=source.open("rb"), purpose="batch", **options)


def refusal(call: Any, status: int = 400) -> openai.APIStatusError:
    """The error a client call raises, checked to have exactly OpenAI's shape."""
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    assert raised.value.status_code == status
    assert isinstance(raised.value.body, dict) and set(raised.value.body) == {"message", "type", "param", "code"}
    return raised.value


def error_of(answer: httpx.Response) -> dict[str, Any]:
    """The error of a raw answer, checked to be exactly ``{"error": {"message", "type", "param", "code"}}``."""
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


class TestErrors:
    def test_a_refused_field_is_named_in_param(self, client: openai.OpenAI, tmp_path: Path) -> None:
        params = {
            "temperature": lambda: client.completions.create(model="m", prompt="x", max_tokens=1, temperature=-1),
            "messages": lambda: client.chat.completions.create(model="m", messages=[], max_tokens=1),
            "model": lambda: client.completions.create(model="nobody", prompt="x", max_tokens=1),
            "limit": lambda: client.files.list(limit=0),
            "order": lambda: client.files.list(order="sideways"),  # type: ignore[arg-type]
            "purpose": lambda: client.files.create(file=("in.jsonl", b"{}\n"), purpose="assistants"),
        }  # fmt: skip
        for param, call in params.items():
            assert refusal(call, 404 if param == "model" else 400).param == param, param
        assert refusal(lambda: client.batches.list(limit=101)).param == "limit"
        too_many = refusal(lambda: client.files.list(limit=10_001))
        assert too_many.param == "limit" and too_many.message.startswith("Error code: 400 - ")
        message = "limit: Input should be less than or equal to 10000"
        assert too_many.body == {"message": message, "type": "invalid_request_error", "param": "limit",
                                 "code": "invalid_request"}  # fmt: skip

    def test_a_missing_body_field_and_a_broken_body(self, http: httpx.Client) -> None:
        missing = http.post("/v1/batches", json={"input_file_id": "file-x"})
        assert missing.status_code == 400
        assert error_of(missing) == {"message": "endpoint: Field required", "type": "invalid_request_error",
                                     "param": "endpoint", "code": "invalid_request"}  # fmt: skip
        broken = http.post("/v1/batches", content=b"{not json", headers={"Content-Type": "application/json"})
        assert broken.status_code == 400
        assert error_of(broken) == {"message": "the request body is not valid JSON", "type": "invalid_request_error",
                                    "param": None, "code": "invalid_json"}  # fmt: skip

    def test_a_refusal_without_a_field_has_no_param(self, client: openai.OpenAI, tmp_path: Path) -> None:
        done = wait_final(
            client,
            client.batches.create(
                input_file_id=upload(client, tmp_path).id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id,
        )
        refused = refusal(lambda: client.batches.cancel(done.id))
        assert (refused.param, refused.code) == (None, "invalid_request")  # fmt: skip

    def test_a_wrong_method_keeps_its_allow_header(self, http: httpx.Client) -> None:
        for method, path, allowed in (("DELETE", "/v1/models", {"GET"}), ("PUT", "/v1/files/file-x", {"GET", "DELETE"}),
                                      ("GET", "/v1/completions", {"POST"})):  # fmt: skip
            answer = http.request(method, path)
            assert answer.status_code == 405 and error_of(answer)["message"] == "Method Not Allowed", path
            assert set(answer.headers["allow"].split(", ")) == allowed, path

    def test_no_documentation_is_served(self, http: httpx.Client) -> None:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            answer = http.get(path)
            assert answer.status_code == 404, path
            assert error_of(answer) == {"message": f"Invalid URL (GET {path})", "type": "invalid_request_error",
                                        "param": None, "code": None}  # fmt: skip


class TestRequestIds:
    def test_every_answer_carries_one(self, gateway: str, http: httpx.Client, conn: redis.Redis) -> None:
        conn.hset(keys.gateway_batch_key("batch_garbage"), "record", "{not json")  # a 500 when read
        answers = {
            200: http.get("/v1/models"), 400: http.get("/v1/files", params={"limit": 0}),
            401: httpx.get(f"{gateway}/v1/models"), 404: http.get("/v1/nothing"), 405: http.delete("/v1/models"),
            413: http.post("/v1/batches", content=b"x" * (MAX_JSON + 1), headers={"Content-Type": "application/json"}),
            500: http.get("/v1/batches/batch_garbage"),
        }  # fmt: skip
        ids = set()
        for status, answer in answers.items():
            assert answer.status_code == status
            assert REQUEST_ID.fullmatch(answer.headers.get("x-request-id", "")), status
            ids.add(answer.headers["x-request-id"])
        assert len(ids) == len(answers)
        assert error_of(answers[500])["type"] == "server_error"

    def test_the_client_reads_it(self, client: openai.OpenAI) -> None:
        raw = client.models.with_raw_response.list()
        assert REQUEST_ID.fullmatch(raw.headers["x-request-id"])
        missing = refusal(lambda: client.files.retrieve("file-000000000000000000000000"), 404)
        assert missing.request_id is not None and REQUEST_ID.fullmatch(missing.request_id)
        assert missing.request_id != raw.headers["x-request-id"]


class TestModels:
    def test_retrieve_answers_what_the_list_shows(self, client: openai.OpenAI, http: httpx.Client) -> None:
        listed = {m.id: m for m in client.models.list().data}
        assert sorted(listed) == ["m", SLASHED_MODEL]
        for model in listed:
            assert client.models.retrieve(model) == listed[model], model
        raw = http.get(f"/v1/models/{SLASHED_MODEL}").json()
        assert raw == {"id": SLASHED_MODEL, "object": "model", "created": listed[SLASHED_MODEL].created,
                       "owned_by": "gpulb"}  # fmt: skip

    def test_a_model_no_live_worker_serves_is_not_found(self, client: openai.OpenAI) -> None:
        for model in ("nobody", "org/nobody", "m/extra"):
            missing = refusal(lambda m=model: client.models.retrieve(m), 404)
            assert (missing.code, missing.param) == ("model_not_found", "model"), model
            assert f"The model {model!r} does not exist" in missing.message


class TestFileListing:
    def test_pages_cover_every_file_once_in_either_order(self, client: openai.OpenAI, tmp_path: Path) -> None:
        made = [upload(client, tmp_path).id for _ in range(105)]  # past the 100 a listing once stopped at
        newest_first = made[::-1]
        assert [f.id for f in client.files.list().data] == newest_first  # the default limit is OpenAI's 10,000
        assert [f.id for f in client.files.list(limit=10)] == newest_first  # the client follows the cursor
        assert [f.id for f in client.files.list(limit=10, order="asc")] == made
        page = client.files.list(limit=10, after=made[50], order="asc")
        assert [f.id for f in page.data] == made[51:61] and page.has_more
        last = client.files.list(limit=10, after=newest_first[94])
        assert [f.id for f in last.data] == newest_first[95:] and last.has_more is False

    def test_a_page_names_its_ends(self, http: httpx.Client, client: openai.OpenAI, tmp_path: Path) -> None:
        made = [upload(client, tmp_path).id for _ in range(3)]
        page = http.get("/v1/files", params={"limit": 2}).json()
        assert (page["first_id"], page["last_id"], page["has_more"]) == (made[2], made[1], True)
        rest = http.get("/v1/files", params={"limit": 2, "after": made[1]}).json()
        assert (rest["first_id"], rest["last_id"], rest["has_more"]) == (made[0], made[0], False)
        empty = http.get("/v1/files", params={"after": made[0]}).json()
        assert (empty["data"], empty["first_id"], empty["last_id"], empty["has_more"]) == ([], None, None, False)
        unknown = http.get("/v1/files", params={"after": "file-000000000000000000000000"})
        assert unknown.status_code == 404 and error_of(unknown)["code"] == "not_found"

    def test_purpose_filters(self, client: openai.OpenAI, tmp_path: Path) -> None:
        inputs = [upload(client, tmp_path).id for _ in range(3)]
        done = wait_final(client, client.batches.create(input_file_id=inputs[0], endpoint="/v1/chat/completions",
                                                        completion_window="24h").id)  # fmt: skip
        assert [f.id for f in client.files.list(purpose="batch_output")] == [done.output_file_id]
        assert [f.id for f in client.files.list(purpose="batch", limit=2)] == inputs[::-1]
        assert list(client.files.list(purpose="fine-tune")) == []


class TestExpiry:
    def test_an_upload_expires_as_asked_or_after_the_store_ttl(
        self, client: openai.OpenAI, conn: redis.Redis, tmp_path: Path
    ) -> None:
        asked = upload(client, tmp_path, expires_after={"anchor": "created_at", "seconds": 3600})
        default = upload(client, tmp_path)
        for made, ttl_s in ((asked, 3600), (default, FILE_TTL_S)):
            assert made.expires_at == made.created_at + ttl_s
            assert client.files.retrieve(made.id).expires_at == made.expires_at
            assert ttl_s - 5 < conn.ttl(keys.gateway_file_key(made.id)) <= ttl_s
        assert {f.id: f.expires_at for f in client.files.list()} == {m.id: m.expires_at for m in (asked, default)}

    def test_an_expiry_out_of_range_is_refused_naming_its_param(self, client: openai.OpenAI, tmp_path: Path) -> None:
        seconds = "expires_after[seconds]"
        for policy, param in (
            ({"anchor": "created_at", "seconds": 3599}, seconds),
            ({"anchor": "created_at", "seconds": 2_592_001}, seconds),
            ({"anchor": "created_at", "seconds": FILE_TTL_S + 1}, seconds),  # longer than this gateway keeps files
            ({"anchor": "last_active_at", "seconds": 3600}, "expires_after[anchor]"),
            ({"anchor": "created_at"}, seconds),
            ({"seconds": 3600}, "expires_after[anchor]"),
        ):
            refused = refusal(lambda p=policy: upload(client, tmp_path, expires_after=p))
            assert refused.param == param, policy
        assert list(client.files.list()) == []

    def test_a_batch_output_expires_as_asked(self, client: openai.OpenAI, conn: redis.Redis, tmp_path: Path) -> None:
        file_id = upload(client, tmp_path).id
        for seconds in (3599, FILE_TTL_S + 1):
            refused = refusal(lambda s=seconds: client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                output_expires_after={"anchor": "created_at", "seconds": s}))  # fmt: skip
            assert refused.param == "output_expires_after.seconds", seconds
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                      output_expires_after={"anchor": "created_at", "seconds": 7200})  # fmt: skip
        output = client.files.retrieve(wait_final(client, batch.id).output_file_id)
        assert output.expires_at == output.created_at + 7200
        assert 7195 < conn.ttl(keys.gateway_file_key(output.id)) <= 7200


class TestBatchCreate:
    def test_metadata_within_openai_limits_only(self, client: openai.OpenAI, tmp_path: Path) -> None:
        file_id = upload(client, tmp_path).id

        def create(metadata: Any) -> Any:
            return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                         completion_window="24h", metadata=metadata)  # fmt: skip

        widest = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
        assert create(widest).metadata == widest
        for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}, ["k"]):
            refused = refusal(lambda m=metadata: create(m))
            assert (refused.param, refused.code) == ("metadata", "invalid_metadata"), metadata
        assert [b.metadata for b in client.batches.list()] == [widest]

    def test_a_model_no_live_worker_serves_fails_the_batch_at_once(
        self, client: openai.OpenAI, conn: redis.Redis, tmp_path: Path
    ) -> None:
        file_id = upload(client, tmp_path, model="nobody").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert (batch.status, batch.model, batch.in_progress_at) == ("failed", "nobody", None)
        assert batch.failed_at is not None and batch.errors is not None
        assert [e.model_dump() for e in batch.errors.data] == [{
            "code": "model_not_found", "line": 1, "param": "body.model",
            "message": "The model 'nobody' does not exist or no live worker serves it; nothing was enqueued",
        }]  # fmt: skip
        assert client.batches.retrieve(batch.id) == batch
        assert conn.keys("gpulb:batch:*") == [] and conn.zcard(keys.gateway_active_key()) == 0  # nothing enqueued


class TestEngineRefusals:
    def test_a_prompt_the_engine_refuses_is_a_400_online_and_its_http_answer_in_the_batch_output(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        """Not a 500 server_error: the engine said the request itself is wrong (here: over its context length)."""
        too_long = "This model's maximum context length is 4096 tokens."
        with FakeOpenAIServer("tiny", delay_s=0.01) as server:
            server.reject_containing("TOO-LONG", too_long)
            worker = WorkerSpec("api", "tiny", backend="openai", max_batch=8, args=("--base-url", server.url))
            with (
                LocalStack(redis_url, [worker], tmp_path / "stack"),
                running_gateway(redis_url, tmp_path / "gateway.log", api_keys=json.dumps([KEY])) as url,
            ):
                client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
                with pytest.raises(openai.BadRequestError) as refused:
                    client.completions.create(model="tiny", prompt="TOO-LONG " * 3, max_tokens=2)
                assert refused.value.body == {"message": f"HTTP 400 from /v1/completions: {too_long}",
                                              "type": "invalid_request_error", "param": None,
                                              "code": "invalid_request"}  # fmt: skip
                assert client.completions.create(model="tiny", prompt="fine", max_tokens=2).choices[0].text
                source = tmp_path / "in.jsonl"
                source.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/completions",
                                                      "body": {"model": "tiny", "prompt": p, "max_tokens": 2}}) + "\n"
                                          for c, p in (("ok", "fine"), ("bad", "TOO-LONG here"))))  # fmt: skip
                uploaded = client.files.create(file=source.open("rb"), purpose="batch")
                batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                              completion_window="24h")  # fmt: skip
                done = wait_final(client, batch.id)
                assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
                [line] = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
        assert (line["custom_id"], line["error"], line["response"]["status_code"]) == ("bad", None, 400)
        assert line["response"]["body"]["error"]["message"] == f"HTTP 400 from /v1/completions: {too_long}"
