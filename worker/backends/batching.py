"""A model of a continuous-batching engine (vLLM, TensorRT-LLM, SGLang), in virtual time.

Pure: no threads, no clock. ``simulated`` wraps it in real time for workers; the benchmarks'
discrete-event runs drive it directly. What it models, as real engines behave:

* each decode step costs ``fixed + per_seq * running`` seconds (plus ``per_prompt_token`` for the prompts
  admitted at that step) and gives every running sequence one token, so throughput grows almost
  linearly with the number running, up to ``slots`` (vLLM's ``max_num_seqs``);
* requests beyond the slots wait in the engine's own FIFO queue and join at a step boundary;
* each request stops at its own end (an EOS drawn from a heavy-tailed distribution, deterministic
  per prompt), or at ``max_tokens``.

Time is event-driven: between two events (a sequence finishing, a request arriving) every step is
alike, so ``advance`` jumps over them instead of counting tokens one by one.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

DEFAULT_SLOTS = 128
# The share of a full step that does not grow with the batch (weights read once per step). 0.25 makes a
# lone sequence run 3.9x faster than one of 128 and the engine 33x faster at 128 than at 1, as a decode-bound
# GPU engine roughly does (vLLM on the CPU measured 17x between 1 and 64 sequences).
DEFAULT_FIXED_SHARE = 0.25
# A prompt token's prefill costs this much of one generated token's share of a full step.
DEFAULT_PREFILL_SHARE = 0.1
# Natural output lengths: lognormal with median 124 (sigma 0.96): a mean of 173 tokens under max_tokens=512,
# 7% of requests stopped by max_tokens; heavy-tailed, as chat traffic is.
DEFAULT_MEDIAN_OUTPUT = 124.0
DEFAULT_OUTPUT_SIGMA = 0.96
_UNIT = NormalDist()


@dataclass(frozen=True, slots=True)
class EngineShape:
    """How fast an engine is: ``tokens_per_s`` generated when all ``slots`` run, and the step's shape."""

    tokens_per_s: float
    slots: int = DEFAULT_SLOTS
    fixed_share: float = DEFAULT_FIXED_SHARE
    prefill_share: float = DEFAULT_PREFILL_SHARE

    def __post_init__(self) -> None:
        if self.tokens_per_s <= 0 or self.slots < 1 or not 0 <= self.fixed_share <= 1 or self.prefill_share < 0:
            raise ValueError(f"invalid engine shape {self}")

    @property
    def full_step_s(self) -> float:
        return self.slots / self.tokens_per_s

    def step_s(self, running: int) -> float:
        full = self.full_step_s
        return full * (self.fixed_share + (1 - self.fixed_share) * running / self.slots)

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill_share * prompt_tokens * self.full_step_s / self.slots

    def tokens_per_s_at(self, running: int) -> float:
        return 0.0 if running <= 0 else running / self.step_s(running)


@dataclass(frozen=True, slots=True)
class LengthModel:
    """Where a simulated request stops by itself: lognormal, drawn from a hash of its prompt."""

    median: float = DEFAULT_MEDIAN_OUTPUT
    sigma: float = DEFAULT_OUTPUT_SIGMA

    def natural_length(self, text: str, seed: Any = None) -> int:
        digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2**64
        return max(1, round(self.median * math.exp(self.sigma * _UNIT.inv_cdf(u))))

    def output_length(self, text: str, max_tokens: int, sampling: dict[str, Any]) -> tuple[int, bool]:
        """(tokens generated, stopped at its own end) for a request, honouring ignore_eos and min_tokens."""
        if sampling.get("ignore_eos"):
            return max_tokens, False
        natural = max(self.natural_length(text, sampling.get("seed")), int(sampling.get("min_tokens") or 0))
        return min(natural, max_tokens), natural < max_tokens


@dataclass(slots=True)
class _Sequence:
    key: Any
    prompt_tokens: int
    tokens: int  # to generate
    end_step: int = 0  # the engine's step count at which it has them all (set when it starts running)


@dataclass(slots=True)
class BatchingCore:
    """The engine's state in virtual time: ``submit`` requests, ``advance`` the clock, collect the finished.

    Running sequences sit in a heap by the step at which they end, so an event costs O(log n), not O(n).
    """

    shape: EngineShape
    clock: float = 0.0  # virtual time of the last step boundary reached
    steps: int = 0  # decode steps run so far
    generated_tokens: int = 0
    running: dict[Any, _Sequence] = field(default_factory=dict)
    waiting: deque[_Sequence] = field(default_factory=deque)
    _ends: list[tuple[int, int, Any]] = field(default_factory=list)  # (end step, order, key); stale entries skipped
    _order: int = 0

    def submit(self, key: Any, prompt_tokens: int, tokens: int, now: float) -> list[Any]:
        """Queue a request that will generate ``tokens``; returns what finished up to ``now``."""
        finished = self.advance(now)
        self.waiting.append(_Sequence(key, prompt_tokens, max(1, tokens)))
        self._admit()
        return finished

    def cancel(self, key: Any) -> bool:
        """Drop a request (an abort); True if it was still there."""
        if self.running.pop(key, None) is not None:
            self._admit()
            return True
        kept = [s for s in self.waiting if s.key != key]
        dropped = len(kept) != len(self.waiting)
        self.waiting = deque(kept)
        return dropped

    def advance(self, now: float) -> list[Any]:
        """Run every step that ends by ``now``; returns the keys of the requests that finished, in order."""
        finished: list[Any] = []
        while self.running:
            step = self.shape.step_s(len(self.running))
            to_next = self._next_end() - self.steps
            steps = min(to_next, math.floor((now - self.clock) / step + 1e-9))
            if steps <= 0:
                break
            self._run(steps, step)
            if steps < to_next:
                break
            finished += self._retire()
        if not self.running:
            self.clock = max(self.clock, now)
        return finished

    def next_event_s(self) -> float | None:
        """Virtual time at which the next request finishes (None when nothing runs)."""
        if not self.running:
            return None
        return self.clock + (self._next_end() - self.steps) * self.shape.step_s(len(self.running))

    def generated_by(self, now: float) -> int:
        """Tokens generated up to ``now``, counting the steps since the last event (a read: changes nothing)."""
        if not self.running or now <= self.clock:
            return self.generated_tokens
        steps = math.floor((now - self.clock) / self.shape.step_s(len(self.running)))
        return self.generated_tokens + min(steps, self._next_end() - self.steps) * len(self.running)

    def progress(self, key: Any, now: float) -> int:
        """Tokens a request has generated up to ``now`` (0 while it waits or once it is gone)."""
        seq = self.running.get(key)
        if seq is None:
            return 0
        steps = self.steps
        if now > self.clock:
            steps += math.floor((now - self.clock) / self.shape.step_s(len(self.running)))
        return max(0, min(seq.tokens, steps - (seq.end_step - seq.tokens)))

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting)

    def _next_end(self) -> int:
        while self._ends[0][2] not in self.running or self.running[self._ends[0][2]].end_step != self._ends[0][0]:
            heapq.heappop(self._ends)  # an aborted sequence's entry
        return self._ends[0][0]

    def _run(self, steps: int, step_s: float) -> None:
        self.steps += steps
        self.generated_tokens += steps * len(self.running)
        self.clock += steps * step_s

    def _retire(self) -> list[Any]:
        done = []
        while self.running and self._next_end() <= self.steps:
            _, _, key = heapq.heappop(self._ends)
            del self.running[key]
            done.append(key)
        self._admit()
        return done

    def _admit(self) -> None:
        """Move waiting requests into free slots; their prefill delays the next step."""
        prompt_tokens = 0
        while self.waiting and len(self.running) < self.shape.slots:
            seq = self.waiting.popleft()
            seq.end_step = self.steps + seq.tokens
            self.running[seq.key] = seq
            self._order += 1
            heapq.heappush(self._ends, (seq.end_step, self._order, seq.key))
            prompt_tokens += seq.prompt_tokens
        self.clock += self.shape.prefill_s(prompt_tokens)
