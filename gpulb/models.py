"""Wire models: what producers, the balancer and workers write to Redis and read back.

Everything on the wire is JSON (or plain numeric hash fields). Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpulb.errors import BadPayload
from gpulb.keys import SCHEMA_VERSION

# A prompt byte costs far less than a generated token (prefill is batched); ~4 bytes a token and
# prefill ~8x cheaper per token than decode gives one cost token per 32 prompt bytes.
PROMPT_BYTES_PER_COST_TOKEN = 32
# Requests whose prompts share this many leading bytes share an affinity key (a prefix block that
# an engine's prefix cache can reuse); shorter prompts have none.
PREFIX_AFFINITY_BYTES = 256
# Integers a request may carry: what engines take (int64), and never so long that str() of one raises (4,300 digits)
MAX_INT64 = 2**63 - 1
MAX_EMBEDDING_INPUTS = 2048  # texts in one embedding request, as the OpenAI API allows


def _short_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=5).hexdigest()


class SamplingParams(BaseModel):
    """Per-request sampling fields, named as vLLM's ``SamplingParams`` names them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # JSON has no inf: it would be null

    temperature: float | None = Field(default=None, ge=0.0, le=10.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT64)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-MAX_INT64 - 1, le=MAX_INT64)
    stop: list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_INT64)
    ignore_eos: bool | None = None


class TextPart(BaseModel):
    """A text part of a chat message's content (the only kind a text model takes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message, as the OpenAI chat API writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


def render_messages(messages: list[dict[str, Any]]) -> str:
    """A plain-text form of a conversation: what cost, affinity and engines without a chat template use."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


class RequestSpec(SamplingParams):
    """One request as a user gives it: a ``prompt`` or chat ``messages``, a token budget, optional
    sampling fields, and an optional ``session`` key (requests of one session prefer the worker that
    served it before)."""

    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # texts to embed (an embedding request: one vector each, nothing generated; max_tokens is unused)
    input: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1,
                                                                   max_length=MAX_EMBEDDING_INPUTS)  # fmt: skip
    max_tokens: int = Field(ge=1)
    session: str | None = Field(default=None, min_length=1, max_length=256)
    custom_id: str | None = Field(default=None, min_length=1, max_length=512)  # the caller's name, echoed back
    stream: bool = False  # the worker publishes its text as the engine makes it (JobHandle.stream, the gateway)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> RequestSpec:
        if [self.prompt, self.messages, self.input].count(None) != 2:
            raise ValueError("give exactly one of prompt (text completion), messages (chat) or input (embeddings)")
        return self

    def sampling(self) -> dict[str, Any]:
        return self.model_dump(exclude={"prompt", "messages", "input", "max_tokens", "session", "custom_id", "stream"},
                               exclude_none=True)  # fmt: skip

    def chat(self) -> list[dict[str, Any]] | None:
        """The messages with their content flattened to text, as engines' chat templates take them."""
        if self.messages is None:
            return None
        return [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in self.messages]

    def input_text(self) -> str:
        if self.input is not None:
            return "\n".join(self.input)
        chat = self.chat()
        return self.prompt if chat is None else render_messages(chat)  # type: ignore[return-value]

    def affinity_key(self) -> str:
        """Its session, or the hash of its first prompt block; "" for a short prompt without session."""
        if self.session is not None:
            return _short_hash(b"s" + self.session.encode())
        head = self.input_text().encode()[:PREFIX_AFFINITY_BYTES]
        return _short_hash(b"p" + head) if len(head) == PREFIX_AFFINITY_BYTES else ""

    def expected_output_tokens(self, learned_mean: float | None = None) -> int:
        """What it will likely generate: the model's learned mean length within its bounds, else max_tokens."""
        if self.input is not None:
            return 0  # an embedding generates nothing: its work is its prompt
        if learned_mean is None or self.ignore_eos:
            return self.max_tokens
        return max(1, min(self.max_tokens, max(self.min_tokens or 0, round(learned_mean))))

    def cost_tokens(self, learned_mean: float | None = None) -> int:
        return max(1, request_cost(len(self.input_text().encode()), self.expected_output_tokens(learned_mean)))

    def payload(self) -> RequestPayload:
        return RequestPayload(prompt=self.prompt, messages=self.chat(), input=self.input, max_tokens=self.max_tokens,
                              sampling=self.sampling(), custom_id=self.custom_id, stream=self.stream)  # fmt: skip


def request_cost(prompt_bytes: int, output_tokens: int) -> int:
    """The work of one request, in the unit workers measure their speed in: expected output tokens plus prefill."""
    return output_tokens + prompt_bytes // PROMPT_BYTES_PER_COST_TOKEN


MIN_LENGTH_SAMPLES = 20  # requests that stopped by themselves before a model's mean output length is trusted


def learned_mean_output(raw: Sequence[str | None]) -> float | None:
    """The mean output length from a model's length stats (``count``, ``tokens``); None until known."""
    try:
        count, tokens = int(raw[0] or 0), int(raw[1] or 0)
    except (ValueError, IndexError):
        return None  # garbage in Redis: fall back to max_tokens
    return tokens / count if count >= MIN_LENGTH_SAMPLES and tokens > 0 else None


class RequestPayload(BaseModel):
    """A request as stored in ``gpulb:batch:B:requests``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    input: list[str] | None = None
    max_tokens: int
    sampling: dict[str, Any] = Field(default_factory=dict)
    custom_id: str | None = None
    stream: bool = False


class Result(BaseModel):
    """The outcome of one request. ``error`` is None on success."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    index: int
    custom_id: str | None = None
    text: str
    output_tokens: int  # completion tokens
    prompt_tokens: int = 0  # as the engine counted them; 0 where it cannot tell
    finish_reason: str | None = None  # "stop", "length"; None for a failed or cancelled request
    worker: str
    error: str | None = None
    # the HTTP status of an engine's refusal of the request itself (400: a prompt over the context length, a bad
    # parameter); None for a success, a cancellation, or a failure that was not the request's fault
    error_status: int | None = None
    embeddings: list[list[float]] | None = None  # an embedding request's vectors, one per input
    cancelled: bool = False
    attempts: int = 1
    submitted_at: float
    started_at: float
    finished_at: float

    @property
    def ok(self) -> bool:
        return self.error is None


class BatchState(StrEnum):
    PENDING = "pending"  # nothing started yet
    RUNNING = "running"
    COMPLETED = "completed"  # every request has a result (some may have failed)
    CANCELLED = "cancelled"  # every request has a result, and some were cancelled


FINAL_STATES = frozenset({BatchState.COMPLETED, BatchState.CANCELLED})


class BatchStatus(BaseModel):
    """Counts of one batch. ``running`` means started on a worker and not yet recorded;
    ``pending`` means waiting in the ingress or in a worker's queue."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    model: str
    total: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int = 0
    state: BatchState
    submitted_at: float
    finished_at: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_hash(cls, batch_id: str, raw: Mapping[str, str]) -> BatchStatus:
        """The batch's record (``gpulb:batch:B``) as counts; :class:`BadPayload` if it holds garbage."""
        try:
            total, running = int(raw["total"]), max(0, int(raw.get("running", 0)))
            completed, failed = int(raw.get("completed", 0)), int(raw.get("failed", 0))
            cancelled = int(raw.get("cancelled", 0))
            state = BatchState(raw.get("state", BatchState.PENDING))
            finished = raw.get("finished_at")
            return cls(
                batch_id=batch_id,
                model=raw["model"],
                total=total,
                pending=max(0, total - running - completed - failed - cancelled),
                running=running,
                completed=completed,
                failed=failed,
                cancelled=cancelled,
                state=state,
                submitted_at=float(raw["submitted_at"]),
                finished_at=float(finished) if finished else None,
                metadata=json.loads(raw.get("metadata", "{}")),
            )
        except (KeyError, ValueError) as exc:
            raise BadPayload(f"batch record {batch_id} is malformed: {exc!r}") from exc


class WorkerState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"  # its engine does not answer: takes no new work until it does


ACCEPTING_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY})


def refill_batch(capacity: int, queue_slots: int) -> int:
    """The smallest micro-batch a continuous worker is refilled with while plenty waits: half its queue, so that
    RQ jobs stay few and large while the engine never runs dry (the balancer sizes, the worker wakes it)."""
    return min(capacity, max(1, queue_slots // 2))


class WorkerLoad(BaseModel):
    """A worker's load key (``gpulb:worker:W:load``): numeric fields, versioned, with a TTL."""

    model_config = ConfigDict(frozen=True)

    v: int = SCHEMA_VERSION
    worker_id: str
    model: str
    backend: str
    state: WorkerState
    capacity: int = Field(ge=1)  # most requests in one micro-batch
    slots: int = Field(default=0, ge=0)  # sequences its engine runs at once; 0: a static-batch engine
    queue_slots: int = Field(default=0, ge=0)  # requests it holds beyond its slots, ready for the next free one
    running: int = Field(default=0, ge=0)  # requests in its engine now
    queued: int = Field(default=0, ge=0)
    tokens_per_s: float = Field(default=0.0, ge=0.0)
    host: str = ""
    pid: int = 0
    gpu: int = -1
    # What the engine and the GPU report; -1 where they cannot tell.
    engine_running: int = -1
    engine_waiting: int = -1
    kv_cache_usage: float = -1.0  # 0..1
    generated_tokens: int = -1  # engine counter since it started
    gpu_util: float = -1.0  # percent
    gpu_mem_used_mb: float = -1.0
    gpu_mem_total_mb: float = -1.0
    ts: float = Field(default_factory=time.time)

    def to_hash(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.model_dump(mode="json").items()}

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> WorkerLoad:
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise BadPayload(f"malformed load key: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
