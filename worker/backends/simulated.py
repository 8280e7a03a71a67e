"""A simulated GPU: deterministic output, and time proportional to the tokens asked for.

The output echoes the prompt's words (a chat's rendered text) to exactly ``max_tokens`` words; the
prompt token count is its number of words.
"""

from __future__ import annotations

import itertools
import threading

from worker.backends.base import LENGTH, Backend, BackendOutput, BackendRequest

FAIL_MARKER = "@@fail"  # with simulate_faults: a request whose prompt holds this makes the batch raise
HANG_MARKER = "@@hang"  # with simulate_faults: a batch holding this never returns (until shutdown)


class SimulatedFault(RuntimeError):
    """The failure a simulated backend raises for a request marked to fail."""


def echo_text(prompt: str, max_tokens: int) -> str:
    """The prompt's words repeated cyclically to exactly ``max_tokens`` words: ``"a b", 3 -> "a b a"``."""
    words = prompt.split() or [""]
    return " ".join(itertools.islice(itertools.cycle(words), max_tokens))


class SimulatedBackend(Backend):
    """A micro-batch of requests totalling T tokens takes T / ``tokens_per_s`` seconds.

    ``tokens_per_s`` may be changed while running (a GPU that throttles). With ``simulate_faults``,
    prompts containing ``@@fail`` or ``@@hang`` make the batch raise or hang (fault-injection tests).
    """

    name = "simulated"

    def __init__(self, tokens_per_s: float, *, simulate_faults: bool = False) -> None:
        if tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be > 0")
        self.tokens_per_s = tokens_per_s
        self.simulate_faults = simulate_faults
        self._stop = threading.Event()

    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        if self.simulate_faults:
            self._inject_faults(requests)
        total = sum(r.max_tokens for r in requests)
        # Event.wait is an interruptible sleep: shutdown() ends a simulated batch at once.
        self._stop.wait(total / self.tokens_per_s)
        return [self._output(r) for r in requests]

    @staticmethod
    def _output(request: BackendRequest) -> BackendOutput:
        text = request.text
        return BackendOutput(text=echo_text(text, request.max_tokens), output_tokens=request.max_tokens,
                             prompt_tokens=len(text.split()), finish_reason=LENGTH)  # fmt: skip

    def _inject_faults(self, requests: list[BackendRequest]) -> None:
        if any(HANG_MARKER in r.text for r in requests):
            self._stop.wait()
        if any(FAIL_MARKER in r.text for r in requests):
            raise SimulatedFault("simulated backend failure")

    def shutdown(self) -> None:
        self._stop.set()
