"""Running a micro-batch on a backend so that one bad request cannot take the others down.

A failing batch is split in halves until the culprit is alone; a request that fails alone is
retried with exponential backoff up to ``max_attempts`` tries, then reported as failed with its
error. Every backend call runs under a time-out proportional to its expected duration.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from gpulb.errors import BackendError
from worker.backends.base import Backend, BackendOutput, BackendRequest, EngineUnavailable, cannot_embed, failed


class BackendTimeout(BackendError):
    """A backend call did not return within its time-out."""


@dataclass(frozen=True, slots=True)
class Outcome:
    output: BackendOutput
    tries: int = 1


@dataclass(frozen=True, slots=True)
class ExecutionPolicy:
    max_attempts: int = 3
    retry_backoff_s: float = 0.5
    min_call_timeout_s: float = 120.0
    call_timeout_factor: float = 10.0


class IsolatingExecutor:
    def __init__(self, backend: Backend, policy: ExecutionPolicy, stop: threading.Event) -> None:
        self.backend = backend
        self.policy = policy
        self.stop = stop

    def run(self, requests: list[BackendRequest], tokens_per_s: float) -> list[Outcome]:
        """One outcome per request, in order; raises :class:`EngineUnavailable` only if every request still
        failed for the engine's sake (busy, unreachable, dead) after its retries: then none of them is to blame
        and the micro-batch goes back to the ingress for another worker."""
        refused = {p: Outcome(cannot_embed(self.backend), 0) for p, r in enumerate(requests)
                   if r.inputs is not None and not self.backend.can_embed}  # fmt: skip
        runnable = [r for p, r in enumerate(requests) if p not in refused]
        ran = iter(self._isolate(runnable, tokens_per_s) if runnable else [])
        outcomes = [refused[p] if p in refused else next(ran) for p in range(len(requests))]
        if outcomes and all(o.output.retryable for o in outcomes):
            raise EngineUnavailable(f"engine unavailable after {max(o.tries for o in outcomes)} tries: "
                                    f"{outcomes[0].output.error}")  # fmt: skip
        return outcomes

    def _isolate(self, requests: list[BackendRequest], tokens_per_s: float) -> list[Outcome]:
        try:
            outputs = self._call(requests, tokens_per_s)
        except EngineUnavailable as exc:  # no request to blame: do not split, retry them all
            outputs = [failed(f"{type(exc).__name__}: {exc}", retryable=True)] * len(requests)
        except Exception as exc:
            if len(requests) == 1:
                return [self._retry_alone(requests[0], tokens_per_s, exc)]
            mid = len(requests) // 2
            return self._isolate(requests[:mid], tokens_per_s) + self._isolate(requests[mid:], tokens_per_s)
        return self._retry_transient(requests, [Outcome(out) for out in outputs], tokens_per_s)

    def _retry_transient(self, requests: list[BackendRequest], outcomes: list[Outcome], tps: float) -> list[Outcome]:
        """Retry, with backoff, the requests whose outputs say the engine was busy or unreachable."""
        tries = 1
        while tries < self.policy.max_attempts:
            pending = [p for p, outcome in enumerate(outcomes) if outcome.output.retryable]
            if not pending or self.stop.wait(self.policy.retry_backoff_s * 2 ** (tries - 1)):
                break
            tries += 1
            try:
                outputs = self._call([requests[p] for p in pending], tps)
            except Exception as exc:
                outputs = [failed(f"{type(exc).__name__}: {exc}", retryable=True)] * len(pending)
            for p, out in zip(pending, outputs, strict=True):
                outcomes[p] = Outcome(out, tries)
        return outcomes

    def _retry_alone(self, request: BackendRequest, tokens_per_s: float, first: Exception) -> Outcome:
        tries, last = 1, first
        while tries < self.policy.max_attempts:
            if self.stop.wait(self.policy.retry_backoff_s * 2 ** (tries - 1)):
                break  # shutting down: report what we have
            tries += 1
            try:
                return Outcome(self._call([request], tokens_per_s)[0], tries)
            except Exception as exc:
                last = exc
        return Outcome(failed(f"{type(last).__name__}: {last}"), tries)

    def timeout_s(self, requests: list[BackendRequest], tokens_per_s: float) -> float:
        expected = sum(r.max_tokens for r in requests) / tokens_per_s if tokens_per_s > 0 else 0.0
        return max(self.policy.min_call_timeout_s, self.policy.call_timeout_factor * expected)

    def _call(self, requests: list[BackendRequest], tokens_per_s: float) -> list[BackendOutput]:
        """``backend.generate`` in a thread, so that a hung engine call is abandoned after its time-out."""
        box: dict[str, object] = {}

        def target() -> None:
            try:
                box["out"] = self.backend.generate(requests)
            except Exception as exc:
                box["err"] = exc

        thread = threading.Thread(target=target, name="gpulb-generate", daemon=True)
        thread.start()
        timeout = self.timeout_s(requests, tokens_per_s)
        thread.join(timeout)
        if thread.is_alive():
            raise BackendTimeout(f"backend did not answer {len(requests)} requests within {timeout:.1f} s")
        if "err" in box:
            raise box["err"]  # type: ignore[misc]
        outputs = box["out"]
        if not isinstance(outputs, list) or len(outputs) != len(requests):
            raise BackendError(f"backend returned {outputs!r:.80} for {len(requests)} requests")
        return outputs
