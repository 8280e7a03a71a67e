"""The small interface every inference backend implements."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from gpulb.errors import BackendError, ConfigError
from gpulb.models import render_messages

STOP = "stop"  # finish reasons, as the OpenAI API names them
LENGTH = "length"


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """One request: a text ``prompt`` or chat ``messages`` (role/content dicts), never both."""

    prompt: str | None
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The prompt, or the conversation rendered as plain text (for engines without a chat template)."""
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


class EngineUnavailable(BackendError):
    """The engine cannot serve anything now (dead, restarting, overloaded): not the requests' fault."""


def failed(error: str, *, retryable: bool = False) -> BackendOutput:
    return BackendOutput(text="", output_tokens=0, error=error, retryable=retryable)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the engine itself knows about its load (None where it cannot tell)."""

    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # 0..1
    generated_tokens: int | None = None  # a counter since the engine started


class Backend(ABC):
    """Loaded once per worker; runs one micro-batch at a time as one engine batch.

    Lifecycle: ``start()`` once (load the model, or wait for the server), then ``generate()`` for
    each micro-batch, ``engine_load()`` and ``healthy()`` from the heartbeat thread, and
    ``shutdown()`` once at the end, after the worker has drained.
    """

    name: str = "backend"

    def start(self) -> None:  # noqa: B027 - optional hook: most backends load in start()
        """Load the model. Called once, before the worker takes work."""

    @abstractmethod
    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        """Run a micro-batch; return one output per request, in order.

        Raise only when the whole batch failed; a failure of one request goes in its output's ``error``.
        """

    def engine_load(self) -> EngineLoad:
        return EngineLoad()

    def healthy(self) -> bool:
        return True

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any engine processes."""


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
