"""``/v1/embeddings`` online and as a batch endpoint, through the official client, on simulated workers whose
embedding model gives each text a vector drawn from its hash (the same text, the same vector)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gpulb.cli.stack import LocalStack, WorkerSpec
from tests.e2e.test_gateway import KEY, running_gateway, simulated_fleet, wait_final
from tests.fake_openai_server import FakeOpenAIServer, fake_embedding
from worker.backends.simulated import simulated_embedding

pytestmark = pytest.mark.e2e
TEXTS = ["alpha beta", "gamma"]


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Iterator[openai.OpenAI]:
    with (
        simulated_fleet(redis_url, tmp_path / "stack"),
        running_gateway(redis_url, tmp_path / "gateway.log", api_keys=json.dumps([KEY])) as url,
    ):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def close(got: list[float], text: str) -> bool:
    """float32 on the wire (base64) keeps about 7 digits."""
    return all(abs(a - b) < 1e-6 for a, b in zip(got, simulated_embedding(text), strict=True))


class TestOnline:
    def test_every_input_gets_its_vector_in_float_and_in_base64(self, client: openai.OpenAI) -> None:
        packed = client.embeddings.create(model="m", input=TEXTS)  # the client asks for base64 and decodes it
        floats = client.embeddings.create(model="m", input=TEXTS, encoding_format="float")
        for answer in (packed, floats):
            assert [(d.object, d.index) for d in answer.data] == [("embedding", 0), ("embedding", 1)]
            assert all(close(d.embedding, text) for d, text in zip(answer.data, TEXTS, strict=True))
            assert (answer.model, answer.usage.prompt_tokens, answer.usage.total_tokens) == ("m", 3, 3)
        assert [d.embedding for d in floats.data] == [simulated_embedding(t) for t in TEXTS]
        one = client.embeddings.create(model="m", input="gamma", encoding_format="float")
        assert one.data[0].embedding == simulated_embedding("gamma")

    def test_what_is_not_supported_is_refused_by_name(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError) as sized:
            client.embeddings.create(model="m", input="x", dimensions=8)
        assert sized.value.body["param"] == "dimensions"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as tokens:
            client.embeddings.create(model="m", input=[[1, 2, 3]])
        assert tokens.value.body["param"] == "input"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="nobody", input="x")


class TestBatch:
    def test_an_embeddings_batch_answers_every_line(self, client: openai.OpenAI, tmp_path: Path) -> None:
        lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "m", "input": [f"text {i}", "and more"]}} for i in range(20)]  # fmt: skip
        source = tmp_path / "in.jsonl"
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))
        uploaded = client.files.create(file=source.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        done = wait_final(client, batch.id)
        assert (done.status, done.request_counts.completed) == ("completed", 20)
        out = [json.loads(x) for x in client.files.content(done.output_file_id or "").text.splitlines()]
        assert sorted(o["custom_id"] for o in out) == sorted(f"e{i}" for i in range(20))
        for o in out:
            i = int(o["custom_id"][1:])
            data = o["response"]["body"]["data"]
            assert [d["embedding"] for d in data] == [simulated_embedding(f"text {i}"), simulated_embedding("and more")]

    def test_base64_in_a_batch_file_is_refused_at_its_line(self, client: openai.OpenAI, tmp_path: Path) -> None:
        line = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                "body": {"model": "m", "input": "x", "encoding_format": "base64"}}  # fmt: skip
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps(line) + "\n")
        uploaded = client.files.create(file=source.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        assert batch.status == "failed" and batch.errors is not None and batch.errors.data
        assert "encoding_format" in (batch.errors.data[0].message or "")


class TestEngineServer:
    def test_an_openai_worker_embeds_through_its_servers_own_endpoint(self, redis_url: str, tmp_path: Path) -> None:
        with FakeOpenAIServer("pooler", embeddings=True) as server:
            worker = WorkerSpec("api", "pooler", backend="openai", args=("--base-url", server.url))
            with (
                LocalStack(redis_url, [worker], tmp_path / "stack"),
                running_gateway(redis_url, tmp_path / "gateway.log", api_keys=json.dumps([KEY])) as url,
            ):
                client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
                answer = client.embeddings.create(model="pooler", input=TEXTS, encoding_format="float")
        assert [d.embedding for d in answer.data] == [fake_embedding(t) for t in TEXTS]
        assert answer.usage.prompt_tokens == 3
