"""The small interface every inference backend implements."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from gpulb.errors import BackendError, ConfigError
from gpulb.models import render_messages

TextSink = Callable[[str], None]
STOP = "stop"  # finish reasons, as the OpenAI API names them
LENGTH = "length"


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """One request: a text ``prompt`` or chat ``messages`` (role/content dicts), never both."""

    prompt: str | None
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None
    # Streaming: called with each new piece of the answer's text as the engine produces it, from the backend's own
    # thread; the pieces joined are the final output's text. None: not streamed. A backend that cannot stream
    # never calls it (the whole text then arrives with the result).
    on_text: TextSink | None = field(default=None, compare=False, repr=False)
    inputs: list[str] | None = None  # an embedding request: one vector for each text, nothing generated

    @property
    def text(self) -> str:
        """The prompt, or the conversation rendered as plain text (for engines without a chat template)."""
        if self.inputs is not None:
            return "\n".join(self.inputs)
        return self.prompt if self.messages is None else render_messages(self.messages)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class BackendOutput:
    """One request's outcome. ``retryable`` marks an error that says nothing about the request (the
    engine was overloaded or unreachable): it is retried with backoff like a failed call."""

    text: str
    output_tokens: int
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    retryable: bool = False
    error_status: int | None = None  # the engine refused the request itself, as this HTTP status would say (400)
    embeddings: list[list[float]] | None = None  # an embedding request's vectors, one per input


class EngineUnavailable(BackendError):
    """The engine cannot serve anything now (dead, restarting, overloaded): not the requests' fault."""


def failed(error: str, *, retryable: bool = False, status: int | None = None) -> BackendOutput:
    return BackendOutput(text="", output_tokens=0, error=error, retryable=retryable, error_status=status)


def refused(error: str) -> BackendOutput:
    """The engine refuses the request itself (a prompt over the context length, a bad parameter): a 400."""
    return failed(error, status=400)


def embedded(vectors: list[list[float]], prompt_tokens: int) -> BackendOutput:
    return BackendOutput(text="", output_tokens=0, prompt_tokens=prompt_tokens, embeddings=vectors)


def cannot_embed(backend: Backend) -> BackendOutput:
    return refused(f"the {backend.name} backend of this worker cannot embed: send embeddings to a worker whose "
                   "model embeds (transformers, an OpenAI-compatible server that serves /v1/embeddings)")  # fmt: skip


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the engine itself knows about its load (None where it cannot tell)."""

    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # 0..1
    generated_tokens: int | None = None  # a counter since the engine started


class Backend(ABC):
    """Loaded once per worker.

    A *static* backend (``continuous = False``: transformers' padded ``generate``, the linear simulator)
    runs one micro-batch at a time as one engine batch: ``generate()``. A *continuous* one (vLLM,
    TensorRT-LLM, an engine server, the batching simulator) takes requests one by one with ``submit()``
    while others run, and each finishes on its own: the worker keeps its ``slots()`` full.

    Lifecycle: ``start()`` once (load the model, or wait for the server), then ``generate()`` or
    ``submit()``, ``engine_load()`` and ``healthy()`` from the heartbeat thread, and ``shutdown()``
    once at the end, after the worker has drained.
    """

    name: str = "backend"
    continuous: bool = False
    can_embed: bool = False  # it answers embedding requests (BackendRequest.inputs); others are refused with a 400

    def start(self) -> None:  # noqa: B027 - optional hook: most backends load in start()
        """Load the model. Called once, before the worker takes work."""

    @abstractmethod
    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        """Run a micro-batch; return one output per request, in order.

        Raise only when the whole batch failed; a failure of one request goes in its output's ``error``.
        """

    def slots(self) -> int | None:
        """How many sequences the engine runs at once (vLLM's max_num_seqs); None if it cannot tell."""
        return None

    def engine_load(self) -> EngineLoad:
        return EngineLoad()

    def healthy(self) -> bool:
        return True

    def dead(self) -> bool:
        """The engine cannot come back in this process (vLLM's EngineDeadError): the worker should exit, so
        that whatever supervises it (``gpulb workers``, compose, systemd) starts a fresh one."""
        return False

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any engine processes."""


class ContinuousBackend(Backend):
    """A backend that batches continuously: ``submit`` one request, get a future of its output.

    The future may fail with an exception (the request, or the engine, failed); ``abort`` asks the engine
    to drop a request the worker gave up on (a time-out), so that it stops holding a slot.
    """

    continuous = True

    @abstractmethod
    def submit(self, request: BackendRequest) -> Future[BackendOutput]:
        """Hand one request to the engine; it starts as soon as the engine has a free slot."""

    def abort(self, future: Future[BackendOutput]) -> None:
        """Drop a submitted request inside the engine (best effort)."""
        future.cancel()

    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        """All at once, each finishing on its own; the same contract as a static backend's."""
        futures = [self.submit(r) for r in requests]
        wait(futures)
        return [f.result() for f in futures]


def import_engine(module: str, extra: str) -> ModuleType:
    """Import a heavy optional engine, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"the {extra} backend needs {module!r}, which is not installed: pip install 'gpulb[{extra}]' ({exc})"
        ) from exc


def one_output(outputs: list[Any], what: str) -> Any:
    """The single completion an engine returned for a request with n=1."""
    if not outputs:
        raise BackendError(f"{what} returned no completion")
    return outputs[0]
