"""OpenAI Batch files: the input format in, the output format out (also what ``vllm run-batch`` takes).

Input, one JSON object a line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "llama", "messages": [...], "max_tokens": 64}}

Every line must use the same ``url`` and ``body.model`` (as the OpenAI Batch API requires). Every
line is checked before anything is enqueued; all bad lines are reported with their numbers.
Output lines carry ``custom_id``, a ``response`` whose ``body`` is shaped like the OpenAI API's
answer, and ``error`` for a request that failed.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpulb.errors import InvalidRequest
from gpulb.models import RequestSpec, Result
from gpulb.settings import ProducerSettings
from producer.validation import CheckedRequest, check_limits, describe_error, shown, validate_model

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (COMPLETIONS, CHAT, EMBEDDINGS)
FLOAT, BASE64 = "float", "base64"  # embeddings' encoding_format
# Body fields taken only with their default meaning (or null), then dropped; model is checked apart.
DEFAULT_ONLY_FIELDS: dict[str, object] = {
    "stream": False, "n": 1, "best_of": 1, "logprobs": False, "echo": False, "store": False,
    "logit_bias": None, "stream_options": None, "top_logprobs": None, "service_tier": None, "suffix": None,
}  # fmt: skip
# Fields the OpenAI spec lets be null, meaning "the default": dropped when null, so the default applies.
NULL_IS_DEFAULT_FIELDS = frozenset({"max_tokens", "max_completion_tokens"})
DROPPED_FIELDS = frozenset({"model", "user", "metadata", "custom_id"})  # custom_id: the line's own, not the body's
MAX_REPORTED_ERRORS = 20


class BadBatchFile(InvalidRequest):
    """Some lines of a batch file are bad: ``lines`` holds (line number, message), every one of them."""

    def __init__(self, message: str, lines: list[tuple[int, str]]) -> None:
        super().__init__(message)
        self.lines = lines


@dataclass(slots=True)
class BatchFile:
    """A checked batch file: one model, one endpoint, its requests in file order (what is submitted)."""

    model: str
    endpoint: str
    checked: list[CheckedRequest] = field(default_factory=list)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The requests as gpulb's Python API takes them (the bodies' OpenAI names translated)."""
        return [request.fields for request in self.checked]

    @property
    def custom_ids(self) -> list[str]:
        return [r["custom_id"] for r in self.requests]


def read_batch_file(path: Path, *, default_max_tokens: int, limits: ProducerSettings) -> BatchFile:
    """Parse and check every line; raises :class:`InvalidRequest` listing the bad lines by number."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            return parse_batch_lines(handle, default_max_tokens=default_max_tokens, limits=limits, source=str(path))
    except OSError as exc:
        raise InvalidRequest(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse_batch_lines(
    lines: Iterable[str], *, default_max_tokens: int, limits: ProducerSettings, source: str = "input",
    endpoint: str | None = None,
) -> BatchFile:  # fmt: skip
    """Check every line (and, given ``endpoint``, that each line's url is it); raises :class:`BadBatchFile`."""
    errors: list[tuple[int, str]] = []
    batch: BatchFile | None = None
    seen: dict[str, int] = {}
    for number, line in enumerate(_without_bom(lines), start=1):
        if not line.strip():
            continue
        try:
            model, url, request = _parse_line(line, default_max_tokens, limits, endpoint)
            batch = batch or BatchFile(model, url)
            _check_same(batch, model, url)
            _check_unique(seen, request.fields["custom_id"], number)
            batch.checked.append(request)
        except InvalidRequest as exc:
            errors.append((number, str(exc)))
    if errors:
        shown = [f"line {n}: {message}" for n, message in errors[:MAX_REPORTED_ERRORS]]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        listing = "\n  ".join(shown)
        raise BadBatchFile(f"{source}: {len(errors)} bad line(s), nothing was submitted:\n  {listing}{more}", errors)
    if batch is None:
        raise InvalidRequest(f"{source}: no requests (the file is empty)")
    if len(batch.checked) > limits.max_batch_requests:
        count, most = len(batch.checked), limits.max_batch_requests
        raise InvalidRequest(f"{source}: {count} requests exceed the limit of {most} per batch")
    return batch


def _without_bom(lines: Iterable[str]) -> Iterator[str]:
    """The lines, the first without a UTF-8 byte order mark (Windows editors write one; the gateway decodes with
    plain utf-8, so it reaches here as U+FEFF)."""
    for number, line in enumerate(lines):
        yield line.removeprefix("\ufeff") if number == 0 else line


def _parse_line(
    line: str, default_max_tokens: int, limits: ProducerSettings, endpoint: str | None
) -> tuple[str, str, CheckedRequest]:
    obj = _load_json(line)
    if not isinstance(obj, dict):
        raise InvalidRequest("expected a JSON object with custom_id, method, url and body")
    custom_id, body = obj.get("custom_id"), obj.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest("custom_id: required, a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise InvalidRequest(f"method: {obj.get('method')!r}: only POST is supported")
    if obj.get("url") not in ENDPOINTS:
        raise InvalidRequest(f"url: {obj.get('url')!r}: expected {COMPLETIONS}, {CHAT} or {EMBEDDINGS}")
    if endpoint is not None and obj["url"] != endpoint:
        raise InvalidRequest(f"url: {obj['url']!r} does not match the batch's endpoint {endpoint!r}")
    if not isinstance(body, dict):
        raise InvalidRequest("body: required, a JSON object")
    model = validate_model(body.get("model"))
    return model, obj["url"], request_from_body(obj["url"], custom_id, body, default_max_tokens, limits)


def _load_json(line: str) -> object:
    """The line's JSON; any line json cannot load (a number past Python's 4,300 digits, nesting past the
    recursion limit) is an :class:`InvalidRequest`, never a traceback."""
    try:
        return json.loads(line.rstrip("\r\n"))  # with its newline, an error at the end is "line 2, column 1"
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"not JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError:  # the int/str conversion limit
        raise InvalidRequest(f"not JSON gpulb accepts: a number over {sys.get_int_max_str_digits():,} digits") from None
    except RecursionError:
        raise InvalidRequest("not JSON gpulb accepts: nested too deeply") from None


def request_from_body(
    url: str, custom_id: str | None, body: dict[str, Any], default_max_tokens: int, limits: ProducerSettings,
    *, encodings: tuple[str, ...] = (FLOAT,),
) -> CheckedRequest:  # fmt: skip
    """A body of ``url`` as a gpulb request; ``encodings``: the embedding encodings the caller can answer in."""
    if url == EMBEDDINGS:
        return embedding_request(custom_id, body, limits, encodings)
    request: dict[str, Any] = {"custom_id": custom_id}
    for name, value in body.items():
        if name in DROPPED_FIELDS or (value is None and name in NULL_IS_DEFAULT_FIELDS):
            continue
        if name in DEFAULT_ONLY_FIELDS:
            _expect_default(name, value)
            continue
        request["max_tokens" if name == "max_completion_tokens" else name] = value
    _expect_input(url, request)
    if isinstance(request.get("stop"), str):
        request["stop"] = [request["stop"]]  # the OpenAI API takes one stop string or a list
    request.setdefault("max_tokens", default_max_tokens)
    return _checked(request, limits)


def embedding_request(
    custom_id: str | None, body: dict[str, Any], limits: ProducerSettings, encodings: tuple[str, ...]
) -> CheckedRequest:  # fmt: skip
    """An embeddings body (``input``: a string or a list of strings) as a gpulb request."""
    for name, value in body.items():
        if name == "encoding_format" and value is not None and value not in encodings:
            raise InvalidRequest(f"body.encoding_format: {shown(value)} is not supported here (only "
                                 f"{' or '.join(encodings)})")  # fmt: skip
        if name == "dimensions" and value is not None:
            raise InvalidRequest("body.dimensions: not supported: vectors have the model's own size")
        if name not in {"input", "encoding_format", "dimensions"} | DROPPED_FIELDS:
            raise InvalidRequest(f"body.{name}: not a field of {EMBEDDINGS} (input, model, encoding_format, user)")
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) for text in inputs):
        raise InvalidRequest("body.input: required, a string or a list of strings (token ids are not supported)")
    return _checked({"custom_id": custom_id, "input": inputs, "max_tokens": 1}, limits)


def _checked(request: dict[str, Any], limits: ProducerSettings) -> CheckedRequest:
    """The one validation of a request from a file or a body: its model, then the producer's limits."""
    try:
        spec = RequestSpec.model_validate(request)
    except ValidationError as exc:
        raise InvalidRequest(describe_error(exc, within="body")) from None
    check_limits(spec, limits)
    return CheckedRequest(request, spec)


def in_base64(answer: dict[str, Any]) -> dict[str, Any]:
    """An embeddings answer with each vector as base64 of little-endian float32 (encoding_format base64)."""
    data = [{**item, "embedding": base64.b64encode(struct.pack(f"<{len(item['embedding'])}f",
                                                               *item["embedding"])).decode()}
            for item in answer["data"]]  # fmt: skip
    return {**answer, "data": data}


def _expect_default(name: str, value: object) -> None:
    default = DEFAULT_ONLY_FIELDS[name]
    # compared with its type: 0 == False and True == 1 would let "stream": 0 or "n": true through
    if value is not None and (type(value) is not type(default) or value != default):
        raise InvalidRequest(f"body.{name}: {shown(value)} is not supported (only {json.dumps(default)})")


def _expect_input(url: str, request: dict[str, Any]) -> None:
    if url == CHAT and "prompt" in request:
        raise InvalidRequest(f"body.prompt: {CHAT} takes messages, not a prompt")
    if url == CHAT and request.get("messages") is None:
        raise InvalidRequest("body.messages: required, a list of chat messages")
    if url == COMPLETIONS and "messages" in request:
        raise InvalidRequest(f"body.messages: {COMPLETIONS} takes a prompt, not messages")
    if url == COMPLETIONS and not isinstance(request.get("prompt"), str):
        raise InvalidRequest("body.prompt: required, one string (lists of prompts or token ids are not supported)")


def _check_same(batch: BatchFile, model: str, endpoint: str) -> None:
    if model != batch.model:
        raise InvalidRequest(f"body.model: {model!r} differs from the first line's {batch.model!r} (one model a file)")
    if endpoint != batch.endpoint:
        raise InvalidRequest(f"url: {endpoint!r} differs from the first line's {batch.endpoint!r} (one url a file)")


def _check_unique(seen: dict[str, int], custom_id: str, number: int) -> None:
    if custom_id in seen:
        raise InvalidRequest(f"custom_id: {custom_id!r} is already used on line {seen[custom_id]}")
    seen[custom_id] = number


# -- output ----------------------------------------------------------------------------------------


def output_line(result: Result, *, model: str, endpoint: str, batch_id: str) -> dict[str, Any]:
    """One line of the OpenAI Batch output format for a result."""
    line: dict[str, Any] = {"id": f"batch_req_{result.request_id}", "custom_id": result.custom_id}
    if result.error is not None and result.error_status is not None:  # the engine refused it: its HTTP answer
        body = {"error": {"message": result.error, "type": "invalid_request_error", "param": None, "code": None}}
        return line | {"response": {"status_code": result.error_status, "request_id": result.request_id, "body": body},
                       "error": None}  # fmt: skip
    if result.error is not None:
        code = "cancelled" if result.cancelled else "request_failed"
        return line | {"response": None, "error": {"code": code, "message": result.error}}
    body = response_body(result, model, endpoint)
    return line | {"response": {"status_code": 200, "request_id": result.request_id, "body": body}, "error": None}


def response_body(result: Result, model: str, endpoint: str) -> dict[str, Any]:
    """The OpenAI API's response body for a successful result (``chat.completion`` or ``text_completion``)."""
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
             "total_tokens": result.prompt_tokens + result.output_tokens}  # fmt: skip
    common = {"created": int(result.finished_at), "model": model, "usage": usage}
    if endpoint == EMBEDDINGS:
        data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in
                enumerate(result.embeddings or [])]  # fmt: skip
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}  # fmt: skip
    if endpoint == CHAT:
        message = {"role": "assistant", "content": result.text, "refusal": None}  # the spec requires refusal
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
        return {"id": f"chatcmpl-{result.request_id}", "object": "chat.completion", "choices": [choice], **common}
    choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return {"id": f"cmpl-{result.request_id}", "object": "text_completion", "choices": [choice], **common}


def write_output(path: Path, lines: Iterator[dict[str, Any]]) -> int:
    """Write JSONL atomically: a temporary file in the same folder, renamed over ``path`` when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                count += 1
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it 0600; the output is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count
