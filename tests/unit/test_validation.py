"""Bad input is refused with an error naming the problem, and Redis is left untouched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from gpulb.cli.redis_server import free_port
from gpulb.errors import BrokerUnavailable, GpulbError, InvalidRequest
from gpulb.models import RequestSpec
from gpulb.settings import Settings
from producer import Client


@pytest.fixture
def fake() -> Iterator[fakeredis.FakeRedis]:
    server = fakeredis.FakeRedis(decode_responses=True)
    yield server
    server.close()


@pytest.fixture
def client(fake: fakeredis.FakeRedis) -> Client:
    settings = Settings(_env_file=None, producer={"max_tokens_limit": 4096})  # type: ignore[call-arg]
    return Client(settings=settings, connection=fake)


BAD_BATCHES: list[tuple[Any, dict[str, Any], str]] = [
    ([], {}, "requests: the batch is empty"),
    ("just one string", {}, "requests: expected a list"),
    (
        [{"max_tokens": 3}],
        {},
        "request 0: request: give exactly one of prompt (text completion), messages (chat) or input (embeddings)",
    ),
    (
        [{"prompt": "p", "messages": [{"role": "user", "content": "hi"}]}],
        {},
        "request 0: request: give exactly one of prompt (text completion), messages (chat) or input (embeddings)",
    ),
    ([{"messages": []}], {}, "request 0: messages: List should have at least 1 item"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], {}, "request 0: messages.0.role: Input should be 'system'"),
    (
        [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}],
        {},
        "request 0: messages.0.content.str: Input should be a valid string",
    ),
    (
        [{"messages": [{"role": "user", "content": "x" * ((1 << 20) + 1)}]}],
        {},
        "request 0: messages: 1048584 bytes exceeds",
    ),
    ([""], {}, "request 0: prompt: String should have at least 1 character"),
    ([{"prompt": 42}], {}, "request 0: prompt: Input should be a valid string"),
    ([{"prompt": "x" * ((1 << 20) + 1)}], {}, "request 0: prompt: 1048577 bytes exceeds the limit of 1048576"),
    (["ok", {"prompt": "p", "max_tokens": 0}], {}, "request 1: max_tokens: Input should be greater than or equal to 1"),
    ([{"prompt": "p", "max_tokens": 5000}], {}, "request 0: max_tokens: 5000 exceeds the limit of 4096"),
    ([{"prompt": "p", "max_tokens": "many"}], {}, "request 0: max_tokens: Input should be a valid integer"),
    (["p"], {"max_tokens": -3}, "request 0: max_tokens: Input should be greater than or equal to 1"),
    ([{"prompt": "p", "temprature": 0.5}], {}, "request 0: temprature: Extra inputs are not permitted"),
    ([{"prompt": "p", "temperature": -1}], {}, "request 0: temperature: Input should be greater than or equal to 0"),
    ([{"prompt": "p", "top_p": 0}], {}, "request 0: top_p: Input should be greater than 0"),
    ([{"prompt": "p", "stop": "END"}], {}, "request 0: stop: Input should be a valid list"),
    ([3.5], {}, "request 0: expected a prompt string or a dict, got float"),
    (["a", "b", ["c"]], {}, "request 2: expected a prompt string or a dict, got list"),
    (["p"], {"model": ""}, "model: '' is not a valid model name"),
    (["p"], {"model": "evil{tag}"}, "model: 'evil{tag}' is not a valid model name"),
    (["p"], {"model": None}, "model: None is not a valid model name"),
    (["p"], {"priority": 1000}, "priority: 1000 must be an integer from -255 to 255"),
    (["p"], {"priority": True}, "priority: True must be an integer"),
]

HUGE = 10**5000  # str() of it raises ValueError (Python's 4,300-digit int/str conversion limit)
# What an adversary tried at the edges: each used to pass, hang a batch, or raise a traceback
EDGE_BATCHES: list[tuple[Any, dict[str, Any], str]] = [
    (["p"], {"model": "m\n"}, "model: 'm\\n' is not a valid model name"),  # "$" matched before the newline
    ([{"prompt": "p", "max_tokens": HUGE}], {}, "request 0: max_tokens: an integer of about 5,001 digits exceeds"),
    (["p"], {"max_tokens": HUGE}, "request 0: max_tokens: an integer of about 5,001 digits exceeds the limit of 4096"),
    ([{"prompt": "p", "seed": HUGE}], {}, "request 0: seed: Input should be less than or equal to 9223372036854775807"),
    ([{"prompt": "p", "min_tokens": HUGE}], {}, "request 0: min_tokens: Input should be less than or equal to"),
    ([{"prompt": "p", "top_k": HUGE}], {}, "request 0: top_k: Input should be less than or equal to"),
    (["p"], {"priority": HUGE}, "priority: an integer of about 5,001 digits must be an integer from -255 to 255"),
    (["p"], {"priority": -HUGE}, "priority: an integer of about 5,001 digits must be an integer"),
    (["p"], {"result_ttl_s": HUGE}, "result_ttl_s: an integer of about 5,001 digits must be a whole number"),
    (["p"], {"model": HUGE}, "model: an integer of about 5,001 digits is not a valid model name"),
    (["p"], {"metadata": {"k": "ok \ud800"}}, "metadata.k: '\\ud800' at character 3 is a lone surrogate"),
    (["p"], {"metadata": {"\udfff": "v"}}, "metadata key: '\\udfff' at character 0 is a lone surrogate"),
    (["ok", "\ud800"], {}, "request 1: prompt: Input should be a valid string, unable to parse raw data as a unicode"),
    (
        ["ok", {"messages": [{"role": "user", "content": "hi \ud800"}]}],
        {},
        "request 1: messages.0.content: '\\ud800' at character 3 is a lone surrogate, not text",
    ),
    (
        [{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]}],
        {},
        "request 0: messages.0.content.0.text: '\\udc80' at character 0 is a lone surrogate",
    ),
    (
        [{"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}],
        {},
        "request 0: messages.0.name: '\\ud800' at character 0 is a lone surrogate",
    ),
    ([{"prompt": "p", "stop": ["END", "\ud800"]}], {}, "request 0: stop.1: '\\ud800' at character 0 is a lone"),
    ([{"prompt": "p", "repetition_penalty": float("inf")}], {}, "request 0: repetition_penalty: Input should be"),
    ([{"prompt": "p", "temperature": float("nan")}], {}, "request 0: temperature: Input should be a finite number"),
]


class TestBatchValidation:
    @pytest.mark.parametrize(("requests", "overrides", "message"), BAD_BATCHES)
    def test_refused_with_named_field_and_nothing_written(
        self, client: Client, fake: fakeredis.FakeRedis, requests: Any, overrides: dict[str, Any], message: str
    ) -> None:
        kwargs: dict[str, Any] = {"model": "m", **overrides}
        with pytest.raises(InvalidRequest) as info:
            client.submit_batch(requests, **kwargs)
        assert message in str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, GpulbError)
        assert fake.keys("*") == []

    @pytest.mark.parametrize(("requests", "overrides", "message"), EDGE_BATCHES)
    def test_edge_input_is_refused_with_named_field_never_a_traceback(
        self, client: Client, fake: fakeredis.FakeRedis, requests: Any, overrides: dict[str, Any], message: str
    ) -> None:
        """Huge integers, lone surrogates, non-finite floats and a model with a final newline: InvalidRequest."""
        with pytest.raises(InvalidRequest) as info:
            client.submit_batch(requests, **{"model": "m", **overrides})
        assert message in str(info.value)
        str(info.value).encode()  # the message itself prints anywhere: no raw surrogate, no huge number
        assert fake.keys("*") == []

    def test_single_submit_refuses_a_huge_max_tokens(self, client: Client, fake: fakeredis.FakeRedis) -> None:
        with pytest.raises(InvalidRequest, match="request 0: max_tokens: an integer of about 5,001 digits"):
            client.submit("hello", model="m", max_tokens=HUGE)
        assert fake.keys("*") == []

    def test_single_submit_refuses_unknown_sampling_field(self, client: Client, fake: fakeredis.FakeRedis) -> None:
        with pytest.raises(ValueError, match="request 0: top_q: Extra inputs are not permitted"):
            client.submit("hello", model="m", top_q=0.3)
        assert fake.keys("*") == []

    def test_one_bad_request_refuses_the_whole_batch(self, client: Client, fake: fakeredis.FakeRedis) -> None:
        requests: list[Any] = [f"prompt {i}" for i in range(999)] + [{"prompt": "p", "max_tokens": 0}]
        with pytest.raises(InvalidRequest, match="request 999: max_tokens"):
            client.submit_batch(requests, model="m")
        assert fake.keys("*") == []

    def test_a_built_request_spec_is_held_to_the_limits(self, fake: fakeredis.FakeRedis) -> None:
        settings = Settings(_env_file=None, producer={"max_prompt_bytes": 8})  # type: ignore[call-arg]
        specs = [RequestSpec(prompt="short", max_tokens=4), RequestSpec(prompt="far too long", max_tokens=4)]
        with pytest.raises(InvalidRequest, match="request 1: prompt: 12 bytes exceeds the limit of 8 bytes"):
            Client(settings=settings, connection=fake).submit_batch(specs, model="m")
        assert fake.keys("*") == []

    def test_batch_size_limit(self, fake: fakeredis.FakeRedis) -> None:
        settings = Settings(_env_file=None, producer={"max_batch_requests": 3})  # type: ignore[call-arg]
        with pytest.raises(InvalidRequest, match="4 requests exceed the limit of 3"):
            Client(settings=settings, connection=fake).submit_batch(["a"] * 4, model="m")
        assert fake.keys("*") == []

    def test_get_batch_refuses_a_malformed_id(self, client: Client) -> None:
        with pytest.raises(InvalidRequest, match="batch_id: 'gpulb:\\*' is not a gpulb batch id"):
            client.get_batch("gpulb:*")
        with pytest.raises(InvalidRequest, match="batch_id: '0123456789abcdef\\\\n' is not a gpulb batch id"):
            client.get_batch("0123456789abcdef\n")


class TestUnreachableRedis:
    def test_submit_raises_broker_unavailable_quickly(self) -> None:
        port = free_port()  # nothing listens there
        client = Client(f"redis://127.0.0.1:{port}/0")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}/0 is unreachable"):
            client.submit("hello", model="m")
        assert time.monotonic() - started < 10  # bounded retries, never a hang

    def test_password_is_not_in_the_error(self) -> None:
        port = free_port()
        client = Client(f"redis://:hunter2@127.0.0.1:{port}/0")
        with pytest.raises(BrokerUnavailable) as info:
            client.submit("hello", model="m")
        assert "hunter2" not in str(info.value)
        assert ":***@127.0.0.1" in str(info.value)
