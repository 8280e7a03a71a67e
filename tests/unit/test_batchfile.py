"""OpenAI Batch files: what a line may say, how bad lines are reported, and the output format."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gpulb.models import Result
from gpulb.settings import ProducerSettings
from producer.batchfile import BadBatchFile, output_line, parse_batch_lines, read_batch_file, write_output

LIMITS = ProducerSettings()


def line(cid: str = "a", url: str = "/v1/chat/completions", **body: Any) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}, ensure_ascii=False)


def parse(*lines: str, endpoint: str | None = None) -> Any:
    return parse_batch_lines("\n".join(lines).split("\n"), default_max_tokens=7, limits=LIMITS, endpoint=endpoint)


class TestLines:
    def test_body_fields_map_onto_a_request(self) -> None:
        batch = parse(line(max_completion_tokens=5, stop="END", logprobs=False, stream=False, n=1, user="u",
                           custom_id="ignored", temperature=0.2))  # fmt: skip
        assert (batch.model, batch.endpoint) == ("m", "/v1/chat/completions")
        assert batch.requests == [{"custom_id": "a", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 5, "stop": ["END"], "temperature": 0.2}]  # fmt: skip
        assert parse(line()).requests[0]["max_tokens"] == 7  # the default, when the body has none

    def test_a_line_separator_inside_a_string_is_text_not_a_new_line(self) -> None:
        batch = parse(line(messages=[{"role": "user", "content": "a\u2028b"}]))
        assert batch.requests[0]["messages"][0]["content"] == "a\u2028b"

    def test_every_bad_line_is_reported_with_its_number(self) -> None:
        with pytest.raises(BadBatchFile) as info:
            parse(line("a"), "[1]", line("b", n=2), line("a"), line("c", url="/v1/completions", prompt="x"),
                  endpoint="/v1/chat/completions")  # fmt: skip
        assert [n for n, _ in info.value.lines] == [2, 3, 4, 5]
        messages = dict(info.value.lines)
        assert messages[2] == "expected a JSON object with custom_id, method, url and body"
        assert messages[3] == "body.n: 2 is not supported (only 1)"
        assert messages[4] == "custom_id: 'a' is already used on line 1"
        assert "does not match the batch's endpoint" in messages[5]

    def test_lines_json_cannot_load_or_text_cannot_encode_are_reported_by_number(self, tmp_path: Path) -> None:
        """A 5,000-digit number, 100,000-deep nesting, lone surrogates and a model with a final newline: each line
        is reported with its number (they raised ValueError, RecursionError, UnicodeEncodeError or passed)."""
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(EDGE_LINES) + "\n", encoding="utf-8")
        with pytest.raises(BadBatchFile) as info:
            read_batch_file(source, default_max_tokens=7, limits=LIMITS)
        assert [n for n, _ in info.value.lines] == list(range(2, len(EDGE_LINES) + 1))
        messages = dict(info.value.lines)
        assert messages[2] == "not JSON gpulb accepts: a number over 4,300 digits"
        assert messages[3] == "not JSON gpulb accepts: nested too deeply"
        assert messages[4] == "not JSON gpulb accepts: nested too deeply"
        assert messages[5].startswith("messages.0.content: '\\ud800' at character 3 is a lone surrogate")
        assert messages[6].startswith("stop.0: '\\udfff' at character 0 is a lone surrogate")
        assert messages[7].startswith("body.prompt: Input should be a valid string")
        assert messages[8].startswith("model: 'm\\n' is not a valid model name")
        assert messages[9] == "body.seed: Input should be less than or equal to 9223372036854775807"
        str(info.value).encode()  # printable as it is


def completion(cid: str, body: str) -> str:
    """A completions line whose body is given as JSON text (to hold what json.dumps would not write)."""
    return f'{{"custom_id": "{cid}", "url": "/v1/completions", "body": {{"model": "m", {body}}}}}'


EDGE_LINES = [
    line("ok"),
    completion("big", '"prompt": "x", "max_tokens": ' + "9" * 5000),
    "[" * 100_000 + "]" * 100_000,
    completion("deep", '"prompt": "x", "stop": ' + "[" * 100_000 + "]" * 100_000),
    line("chat", messages=[{"role": "user", "content": "hi \\ud800"}]).replace("\\\\ud800", "\\ud800"),
    completion("stop", '"prompt": "x", "stop": "\\udfff"'),
    completion("prompt", '"prompt": "\\ud800"'),
    line("nl", model="m\n"),
    line("seed", seed=2**63),
]


class TestOutput:
    def result(self, **kw: Any) -> Result:
        base = {"request_id": "b-0", "index": 0, "custom_id": "q", "text": "hello", "output_tokens": 2,
                "prompt_tokens": 3, "finish_reason": "length", "worker": "w", "submitted_at": 1.0,
                "started_at": 2.0, "finished_at": 3.0}  # fmt: skip
        return Result(**{**base, **kw})

    def test_completion_and_error_lines(self) -> None:
        ok = output_line(self.result(), model="m", endpoint="/v1/completions", batch_id="b")
        assert ok["custom_id"] == "q" and ok["error"] is None and ok["response"]["status_code"] == 200
        body = ok["response"]["body"]
        assert (body["object"], body["choices"][0]["text"], body["usage"]["total_tokens"]) == (
            "text_completion",
            "hello",
            5,
        )
        bad = output_line(self.result(error="boom", finish_reason=None), model="m", endpoint="/v1/completions",
                          batch_id="b")  # fmt: skip
        assert bad["response"] is None and bad["error"] == {"code": "request_failed", "message": "boom"}

    def test_a_request_the_engine_refused_carries_the_engines_http_answer(self) -> None:
        """As OpenAI's batch output does: the status code and an error body, and no batch-level error."""
        refused = self.result(error="HTTP 400 from /v1/completions: too long", error_status=400, finish_reason=None)
        line = output_line(refused, model="m", endpoint="/v1/completions", batch_id="b")
        assert line == {"id": "batch_req_b-0", "custom_id": "q", "error": None, "response": {
            "status_code": 400, "request_id": "b-0", "body": {"error": {
                "message": "HTTP 400 from /v1/completions: too long", "type": "invalid_request_error", "param": None,
                "code": None}}}}  # fmt: skip

    def test_written_whole_or_not_at_all_with_ordinary_permissions(self, tmp_path: Path) -> None:
        target = tmp_path / "out.jsonl"
        assert write_output(target, iter([{"a": 1}, {"b": 2}])) == 2
        assert target.read_text() == '{"a": 1}\n{"b": 2}\n'
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask

        def broken() -> Any:
            yield {"c": 3}
            raise RuntimeError("disk gone")

        with pytest.raises(RuntimeError):
            write_output(target, broken())
        assert target.read_text() == '{"a": 1}\n{"b": 2}\n' and sorted(p.name for p in tmp_path.iterdir()) == [
            "out.jsonl"
        ]
