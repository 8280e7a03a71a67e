"""What the OpenAI spec says a batch file or request body may hold, and what an answer must hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gpulb.errors import InvalidRequest
from gpulb.models import RequestSpec, Result
from gpulb.settings import ProducerSettings
from producer.batchfile import (
    CHAT,
    COMPLETIONS,
    BadBatchFile,
    output_line,
    parse_batch_lines,
    read_batch_file,
    request_from_body,
    response_body,
)
from producer.validation import describe_error, validate_requests

LIMITS = ProducerSettings()
HI = [{"role": "user", "content": "hi"}]


def chat_line(cid: str = "a", **body: Any) -> str:
    body = {"model": "m", "messages": HI, **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body})


def completion_line(cid: str = "a", **body: Any) -> str:
    body = {"model": "m", "prompt": "p", **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": COMPLETIONS, "body": body})


def parse(text: str) -> Any:
    """As the gateway parses an uploaded file: decoded text split on newlines."""
    return parse_batch_lines(text.split("\n"), default_max_tokens=7, limits=LIMITS)


def refusals(*lines: str) -> dict[int, str]:
    with pytest.raises(BadBatchFile) as info:
        parse("\n".join(lines))
    return dict(info.value.lines)


def result() -> Result:
    return Result(request_id="b-0", index=0, custom_id="q", text="hello", output_tokens=2, prompt_tokens=3,
                  finish_reason="stop", worker="w", submitted_at=1.0, started_at=2.0, finished_at=3.0)  # fmt: skip


class TestChatMessage:
    def test_an_answer_carries_a_null_refusal(self) -> None:
        """The spec requires ``refusal`` in a chat completion's message; strict clients fail without it."""
        body = response_body(result(), "m", CHAT)
        assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello", "refusal": None},
                                    "logprobs": None, "finish_reason": "stop"}]  # fmt: skip

    def test_a_batch_output_line_carries_it_too(self) -> None:
        line = output_line(result(), model="m", endpoint=CHAT, batch_id="b")
        assert line["response"]["body"]["choices"][0]["message"] == {
            "role": "assistant", "content": "hello", "refusal": None,
        }  # fmt: skip

    def test_a_text_completion_has_no_message(self) -> None:
        body = response_body(result(), "m", COMPLETIONS)
        assert body["choices"] == [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": "stop"}]


class TestNullMeansDefault:
    def test_null_parameters_of_a_chat_body_are_accepted(self) -> None:
        """Clients generated from the spec send every optional parameter, as null when unset."""
        names = ("max_tokens", "max_completion_tokens", "logit_bias", "stream_options", "top_logprobs", "service_tier",
                 "best_of", "n", "stream", "temperature")  # fmt: skip
        nulls: dict[str, Any] = dict.fromkeys(names)
        batch = parse(chat_line(**nulls))
        assert batch.requests == [{"custom_id": "a", "messages": HI, "max_tokens": 7, "temperature": None}]

    def test_null_parameters_of_a_completions_body_are_accepted(self) -> None:
        batch = parse(completion_line(suffix=None, best_of=None, max_tokens=None, logit_bias=None, echo=None))
        assert batch.requests == [{"custom_id": "a", "prompt": "p", "max_tokens": 7}]

    def test_best_of_one_is_the_default_and_accepted(self) -> None:
        assert parse(completion_line(best_of=1, max_tokens=5)).requests == [
            {"custom_id": "a", "prompt": "p", "max_tokens": 5}
        ]

    def test_a_null_max_tokens_leaves_max_completion_tokens_in_force(self) -> None:
        batch = parse(chat_line(max_tokens=None, max_completion_tokens=5))
        assert batch.requests[0]["max_tokens"] == 5

    def test_an_online_body_with_null_max_tokens_gets_the_default_it_is_given(self) -> None:
        body = {"model": "m", "prompt": "p", "max_tokens": None, "suffix": None}
        assert request_from_body(COMPLETIONS, None, body, 99, LIMITS).fields == {"custom_id": None, "prompt": "p",
                                                                                 "max_tokens": 99}  # fmt: skip

    def test_values_other_than_the_default_are_refused_by_name(self) -> None:
        messages = refusals(
            completion_line("a", best_of=3),
            chat_line("b", logit_bias={"50256": -100}),
            chat_line("c", stream_options={"include_usage": True}),
            chat_line("d", top_logprobs=2),
            chat_line("e", service_tier="flex"),
            completion_line("f", suffix="end"),
            chat_line("g", stream=0),
            chat_line("h", n=True),
            chat_line("i", temprature=0.5),
            chat_line("j", max_tokens=0),
        )
        assert messages == {
            1: "body.best_of: 3 is not supported (only 1)",
            2: "body.logit_bias: {'50256': -100} is not supported (only null)",
            3: "body.stream_options: {'include_usage': True} is not supported (only null)",
            4: "body.top_logprobs: 2 is not supported (only null)",
            5: "body.service_tier: 'flex' is not supported (only null)",
            6: "body.suffix: 'end' is not supported (only null)",
            7: "body.stream: 0 is not supported (only false)",
            8: "body.n: True is not supported (only 1)",
            9: "body.temprature: Extra inputs are not permitted",
            10: "body.max_tokens: Input should be greater than or equal to 1",
        }


class TestByteOrderMark:
    def test_a_file_starting_with_a_bom_is_read(self, tmp_path: Path) -> None:
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"\xef\xbb\xbf" + (chat_line("a") + "\n" + chat_line("b") + "\n").encode())
        assert read_batch_file(source, default_max_tokens=7, limits=LIMITS).custom_ids == ["a", "b"]

    def test_text_starting_with_a_bom_is_parsed(self) -> None:
        """The gateway decodes an uploaded file with utf-8, which keeps the BOM as U+FEFF."""
        text = (b"\xef\xbb\xbf" + chat_line().encode()).decode("utf-8")
        assert parse(text).custom_ids == ["a"]

    def test_a_bom_alone_on_the_first_line_is_a_blank_line(self) -> None:
        assert parse("\ufeff\n" + chat_line()).custom_ids == ["a"]


class TestJsonErrorColumn:
    def test_an_error_at_the_end_of_a_line_names_its_column(self, tmp_path: Path) -> None:
        source = tmp_path / "in.jsonl"
        source.write_text(chat_line() + '\n{"custom_id": "b"\n', encoding="utf-8")
        with pytest.raises(BadBatchFile) as info:
            read_batch_file(source, default_max_tokens=7, limits=LIMITS)
        assert info.value.lines == [(2, "not JSON: Expecting ',' delimiter (column 18)")]

    def test_a_windows_line_end_is_not_counted(self) -> None:
        """The gateway splits on \n only, so a line keeps its \r."""
        lines = refusals(chat_line() + '\r\n{"custom_id": "b"\r\n')
        assert lines == {2: "not JSON: Expecting ',' delimiter (column 18)"}


class TestErrorMessages:
    def test_an_error_about_the_whole_request_has_no_pydantic_prefix(self) -> None:
        with pytest.raises(ValidationError) as info:
            RequestSpec.model_validate({"max_tokens": 3})
        whole = "give exactly one of prompt (text completion), messages (chat) or input (embeddings)"
        assert describe_error(info.value) == f"request: {whole}"
        assert describe_error(info.value, within="body") == f"body: {whole}"

    def test_a_field_error_is_prefixed_with_where_it_is(self) -> None:
        with pytest.raises(ValidationError) as info:
            RequestSpec.model_validate({"prompt": "p", "max_tokens": 3, "top_p": 0, "top_k": "x"})
        assert describe_error(info.value, within="body") == "body.top_p: Input should be greater than 0 (and 1 more)"

    def test_client_batches_report_it_without_the_prefix(self) -> None:
        with pytest.raises(InvalidRequest) as info:
            validate_requests([{"max_tokens": 3}], max_tokens=7, limits=LIMITS)
        assert str(info.value) == (
            "request 0: request: give exactly one of prompt (text completion), messages (chat) or input (embeddings)"
        )

    def test_a_chat_body_without_messages_says_so(self) -> None:
        assert refusals(chat_line("a", messages=None), completion_line("b", prompt=None)) == {
            1: "body.messages: required, a list of chat messages",
            2: "body.prompt: required, one string (lists of prompts or token ids are not supported)",
        }
