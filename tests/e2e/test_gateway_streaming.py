"""``stream: true`` end to end: the official client's streaming against a gateway and simulated workers that
batch continuously and publish their text as they make it; a client that goes away aborts its request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from gpulb import keys
from gpulb.cli.stack import LocalStack, WorkerSpec
from gpulb.models import Result
from producer import Client
from tests.e2e.test_gateway import KEY, running_gateway

pytestmark = pytest.mark.e2e
PROMPT = "alpha beta gamma delta"


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """One slow engine (2,000 tok/s with its 128 slots full: a lone request makes about 60 tokens a second)."""
    with (
        LocalStack(redis_url, [WorkerSpec("slow", "m", 2000)], tmp_path / "stack"),
        running_gateway(redis_url, tmp_path / "gateway.log", api_keys=json.dumps([KEY])) as url,
    ):
        yield url


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)


class TestStreaming:
    def test_completions_stream_piece_by_piece_and_end_with_usage(self, client: openai.OpenAI) -> None:
        whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=40, extra_body={"ignore_eos": True})
        chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=40, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))  # fmt: skip
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        assert len(texts) > 3  # as the engine made them, not all at the end
        assert "".join(texts) == whole.choices[0].text
        *body, last_choice, usage = chunks
        assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
        assert all(c.choices[0].finish_reason is None and c.usage is None for c in body)
        assert (last_choice.choices[0].text, last_choice.choices[0].finish_reason) == ("", "length")
        assert usage.choices == [] and usage.usage is not None
        assert (usage.usage.completion_tokens, usage.usage.prompt_tokens) == (40, 4)

    def test_chat_streams_deltas_after_the_role(self, client: openai.OpenAI) -> None:
        messages = [{"role": "user", "content": PROMPT}]
        whole = client.chat.completions.create(model="m", messages=messages, max_tokens=30,  # type: ignore[arg-type]
                                               extra_body={"ignore_eos": True})  # fmt: skip
        chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=30,  # type: ignore[arg-type]
                                                     stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        first, *middle, last = chunks
        assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
        assert "".join(c.choices[0].delta.content or "" for c in middle) == whole.choices[0].message.content
        assert len(middle) > 3 and last.choices[0].finish_reason == "length" and last.usage is None

    def test_a_client_that_goes_away_aborts_its_request_in_the_engine(self, gateway: str, redis_url: str) -> None:
        """400 tokens would take the lone request several seconds; the engine must drop it once the client closes."""
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gateway}/v1/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {KEY}"}) as response:  # fmt: skip
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first.removeprefix("data: "))["id"].removeprefix("cmpl-")
        batch_id, index = request_id.rsplit("-", 1)
        deadline = time.monotonic() + 10
        while (raw := conn.hget(keys.batch_results_key(batch_id), index)) is None:
            assert time.monotonic() < deadline, "the abandoned request was not stopped"
            time.sleep(0.1)
        result = Result.model_validate_json(raw)
        assert result.cancelled and result.output_tokens < 400
        assert conn.get(keys.abort_key(batch_id)) == "1"


class TestPythonStreaming:
    def test_a_job_handle_streams_its_text_then_its_result(self, gateway: str, redis_url: str) -> None:
        with Client(redis_url) as client:
            job = client.submit(PROMPT, model="m", max_tokens=30, ignore_eos=True, stream=True)
            items = list(job.stream(timeout=30))
        *pieces, result = items
        assert isinstance(result, Result) and all(isinstance(p, str) for p in pieces)
        assert len(pieces) > 3 and "".join(pieces) == result.text and result.output_tokens == 30  # type: ignore[arg-type]
