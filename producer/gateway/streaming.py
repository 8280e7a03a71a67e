"""``stream: true`` on completions and chat: server-sent events in OpenAI's chunk format.

The request goes through the balancer at online priority like any other; its worker publishes the text as the
engine makes it (:mod:`producer.streaming` reads it). Each piece becomes one ``data: {chunk}`` event, the result
a last chunk with its ``finish_reason`` (and one with ``usage`` when ``stream_options.include_usage``), then
``data: [DONE]``. A client that goes away aborts the request in the engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import redis
from fastapi.responses import StreamingResponse

from gpulb import keys
from gpulb.errors import GpulbError
from gpulb.logs import get_logger
from gpulb.models import Result
from producer.batchfile import CHAT
from producer.client import BatchHandle
from producer.streaming import abort, follow_text

log = get_logger("gpulb.gateway")
DONE = "data: [DONE]\n\n"


class Chunks:
    """The chunk objects of one streamed answer."""

    def __init__(self, endpoint: str, model: str, request_id: str, include_usage: bool) -> None:
        self.chat = endpoint == CHAT
        self.include_usage = include_usage
        self.head: dict[str, Any] = {
            "id": f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()), "model": model,
        }  # fmt: skip

    def opening(self) -> list[dict[str, Any]]:
        """A chat stream opens with the assistant's role, as OpenAI's does."""
        return [self._choice({"role": "assistant", "content": "", "refusal": None})] if self.chat else []

    def text(self, piece: str) -> dict[str, Any]:
        return self._choice({"content": piece} if self.chat else piece)

    def closing(self, result: Result) -> list[dict[str, Any]]:
        last = [self._choice({} if self.chat else "", finish_reason=result.finish_reason)]
        if self.include_usage:
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
                     "total_tokens": result.prompt_tokens + result.output_tokens}  # fmt: skip
            last.append({**self.head, "choices": [], "usage": usage})
        return last

    def _choice(self, content: dict[str, Any] | str, finish_reason: str | None = None) -> dict[str, Any]:
        field = {"delta": content} if self.chat else {"text": content}
        choice = {"index": 0, **field, "logprobs": None, "finish_reason": finish_reason}
        return {**self.head, "choices": [choice]} | ({"usage": None} if self.include_usage else {})


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def error_event(message: str, kind: str, code: str) -> str:
    return event({"error": {"message": message, "type": kind, "param": None, "code": code}})


def stream_response(batch: BatchHandle, chunks: Chunks, timeout_s: float, limiter: anyio.CapacityLimiter) -> Any:
    return StreamingResponse(_events(batch, chunks, timeout_s, limiter), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})  # fmt: skip


async def _events(
    batch: BatchHandle, chunks: Chunks, timeout_s: float, limiter: anyio.CapacityLimiter
) -> AsyncIterator[str]:
    pieces = follow_text(batch.client.connection, batch.id, 0, timeout_s)
    answered = False
    try:
        for chunk in chunks.opening():
            yield event(chunk)
        async for item in _in_threads(pieces, limiter):
            if isinstance(item, str):
                yield event(chunks.text(item))
                continue
            answered = True
            yield _ending(item, chunks)
        yield DONE
    except (GpulbError, redis.RedisError) as exc:  # timed out, run twice, or Redis went away: an error event
        yield error_event(str(exc), "server_error", "request_failed")
        yield DONE
    finally:
        if not answered:  # the client went away, or it failed: nobody waits for it any more
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_abandon, batch)


def _ending(result: Result, chunks: Chunks) -> str:
    if result.ok:
        return "".join(event(chunk) for chunk in chunks.closing(result))
    status = result.error_status
    kind = "invalid_request_error" if status is not None and 400 <= status < 500 else "server_error"
    return error_event(str(result.error), kind, "request_failed")


async def _in_threads(pieces: Iterator[str | Result], limiter: anyio.CapacityLimiter) -> AsyncIterator[str | Result]:
    """The blocking reader's items, each read in a worker thread (one at a time: the iterator is not shared)."""
    while (item := await anyio.to_thread.run_sync(next, pieces, None, limiter=limiter)) is not None:
        yield item


def _abandon(batch: BatchHandle) -> None:
    try:
        abort(batch.client.connection, batch.id)
        batch.cancel()
    except Exception as exc:  # the request runs to its end: it is only wasted work
        log.warning("could not abort an abandoned stream", request_id=keys.request_id(batch.id, 0), error=str(exc))
