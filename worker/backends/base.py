"""The small interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class BackendRequest:
    prompt: str
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendOutput:
    text: str
    output_tokens: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the engine itself knows about its load (None where it cannot tell)."""

    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None


class Backend(ABC):
    """Loaded once per worker; runs one micro-batch at a time as one engine batch."""

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
