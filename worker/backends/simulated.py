"""Simulated GPUs, for demos, tests and benchmarks: no model, deterministic output.

``simulated`` (the default) batches continuously, as vLLM does (:mod:`worker.backends.batching`):
``--tokens-per-s`` is what it generates with all its slots busy, a lone request runs far slower than
that, and each request stops at its own end, drawn from its prompt. ``simulated-linear`` is the old
model, kept as an explicit option: a micro-batch of T tokens takes T / ``tokens_per_s``, every request
produces exactly ``max_tokens``.

The output echoes the prompt's words (a chat's rendered text) to the generated length; the prompt
token count is its number of words.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from worker.backends.base import (
    LENGTH,
    STOP,
    Backend,
    BackendOutput,
    BackendRequest,
    ContinuousBackend,
    EngineLoad,
    TextSink,
    embedded,
)
from worker.backends.batching import (
    DEFAULT_MEDIAN_OUTPUT,
    DEFAULT_OUTPUT_SIGMA,
    BatchingCore,
    EngineShape,
    LengthModel,
)

FAIL_MARKER = "@@fail"  # with simulate_faults: a request whose prompt holds this fails (the batch raises)
HANG_MARKER = "@@hang"  # with simulate_faults: a request holding this never finishes (until shutdown)
ENGINE_ARGS = {"slots", "fixed_share", "prefill_share", "median_output_tokens", "output_sigma"}
STREAM_TICK_S = 0.05  # how often a streamed request's new words go out
EMBEDDING_DIM = 16  # the simulated embedding model's vector size


@dataclass(slots=True)
class _TextFeed:
    """A streamed request's words, and how many went out."""

    on_text: TextSink
    words: list[str]
    sent: int = 0

    def upto(self, count: int) -> str:
        """The words after the ones sent, up to ``count`` of them in all, as the joined text continues them."""
        start, self.sent = self.sent, max(self.sent, min(count, len(self.words)))
        return "".join(word if i == 0 else f" {word}" for i, word in enumerate(self.words[start : self.sent], start))


class SimulatedFault(RuntimeError):
    """The failure a simulated backend raises for a request marked to fail."""


def echo_words(prompt: str, max_tokens: int) -> list[str]:
    """The prompt's words repeated cyclically to exactly ``max_tokens`` words."""
    return list(itertools.islice(itertools.cycle(prompt.split() or [""]), max_tokens))


def echo_text(prompt: str, max_tokens: int) -> str:
    """The prompt's words repeated cyclically to exactly ``max_tokens`` words: ``"a b", 3 -> "a b a"``."""
    return " ".join(echo_words(prompt, max_tokens))


def simulated_embedding(text: str) -> list[float]:
    """A unit vector of ``EMBEDDING_DIM`` floats drawn from the text's hash: the same text, the same vector."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [int.from_bytes(digest[i : i + 2], "little") / 32767.5 - 1.0 for i in range(0, 2 * EMBEDDING_DIM, 2)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def embed_output(request: BackendRequest) -> BackendOutput:
    texts = request.inputs or []
    return embedded([simulated_embedding(t) for t in texts], sum(len(t.split()) for t in texts))


def echo_output(request: BackendRequest, tokens: int, finish_reason: str) -> BackendOutput:
    if request.inputs is not None:
        return embed_output(request)
    text = request.text
    return BackendOutput(text=echo_text(text, tokens), output_tokens=tokens, prompt_tokens=len(text.split()),
                         finish_reason=finish_reason)  # fmt: skip


class LinearSimulatedBackend(Backend):
    """A micro-batch of requests totalling T tokens takes T / ``tokens_per_s`` seconds.

    ``tokens_per_s`` may be changed while running (a GPU that throttles). With ``simulate_faults``,
    prompts containing ``@@fail`` or ``@@hang`` make the batch raise or hang (fault-injection tests).
    """

    name = "simulated-linear"
    can_embed = True

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
        return [echo_output(r, r.max_tokens, LENGTH) for r in requests]

    def _inject_faults(self, requests: list[BackendRequest]) -> None:
        if any(HANG_MARKER in r.text for r in requests):
            self._stop.wait()
        if any(FAIL_MARKER in r.text for r in requests):
            raise SimulatedFault("simulated backend failure")

    def shutdown(self) -> None:
        self._stop.set()


class SimulatedBackend(ContinuousBackend):
    """A continuous-batching engine in real time: a thread runs :class:`BatchingCore` against the clock.

    Engine arguments (``--engine-args``): ``slots`` (128), ``fixed_share`` (0.25), ``prefill_share`` (0.1),
    ``median_output_tokens`` (124), ``output_sigma`` (0.96). ``tokens_per_s`` may be changed while running.
    """

    name = "simulated"
    can_embed = True

    def __init__(
        self, tokens_per_s: float, *, simulate_faults: bool = False, engine_args: dict[str, Any] | None = None
    ) -> None:
        args = dict(engine_args or {})
        unknown = set(args) - ENGINE_ARGS
        if unknown:
            raise ValueError(f"unknown simulated engine argument(s) {sorted(unknown)}; known: {sorted(ENGINE_ARGS)}")
        self._shape_args = {k: args[k] for k in ("slots", "fixed_share", "prefill_share") if k in args}
        self.lengths = LengthModel(float(args.get("median_output_tokens", DEFAULT_MEDIAN_OUTPUT)),
                                   float(args.get("output_sigma", DEFAULT_OUTPUT_SIGMA)))  # fmt: skip
        self.simulate_faults = simulate_faults
        self._core = BatchingCore(EngineShape(tokens_per_s, **self._shape_args))
        self._pending: dict[int, tuple[Future[BackendOutput], BackendOutput]] = {}
        self._feeds: dict[int, _TextFeed] = {}  # streamed requests
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._stopped = False
        self._epoch = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="gpulb-simulated-engine", daemon=True)
        self._thread.start()

    @property
    def tokens_per_s(self) -> float:
        return self._core.shape.tokens_per_s

    @tokens_per_s.setter
    def tokens_per_s(self, value: float) -> None:  # a GPU that throttles
        with self._lock:
            finished = self._core.advance(self._now())
            self._core.shape = EngineShape(value, **self._shape_args)
            self._lock.notify()
        self._resolve(finished)

    def slots(self) -> int:
        return self._core.shape.slots

    def submit(self, request: BackendRequest) -> Future[BackendOutput]:
        future: Future[BackendOutput] = Future()  # left pending, not running: abort() can still cancel it
        text = request.text
        if self.simulate_faults and FAIL_MARKER in text:
            future.set_exception(SimulatedFault("simulated backend failure"))
            return future
        tokens, stopped = self.lengths.output_length(text, request.max_tokens, request.sampling)
        if request.inputs is not None:
            tokens = 1  # one pass over the prompt, nothing generated
        output = echo_output(request, tokens, STOP if stopped else LENGTH)
        if self.simulate_faults and HANG_MARKER in text:
            tokens = 1 << 40  # never finishes, but holds its slot as a stuck request does
        with self._lock:
            if self._stopped:
                future.set_exception(RuntimeError("simulated engine shut down"))
                return future
            key = next(self._ids)
            self._pending[key] = (future, output)
            if request.on_text is not None:
                self._feeds[key] = _TextFeed(request.on_text, echo_words(request.text, output.output_tokens))
            finished = self._core.submit(key, output.prompt_tokens, tokens, self._now())
            self._lock.notify()
        self._resolve(finished)
        return future

    def abort(self, future: Future[BackendOutput]) -> None:
        with self._lock:
            key = next((k for k, (f, _) in self._pending.items() if f is future), None)
            if key is not None:
                self._core.cancel(key)
                del self._pending[key]
                self._feeds.pop(key, None)
        future.cancel()

    def engine_load(self) -> EngineLoad:
        with self._lock:
            core = self._core
            return EngineLoad(running=len(core.running), waiting=len(core.waiting),
                              kv_cache_usage=len(core.running) / core.shape.slots,
                              generated_tokens=core.generated_by(self._now()))  # fmt: skip

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            pending, self._pending = self._pending, {}
            self._lock.notify()
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(RuntimeError("simulated engine shut down"))

    def _now(self) -> float:
        return time.monotonic() - self._epoch

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                finished = self._core.advance(self._now())
                pieces = self._due_pieces()
                if not finished and not pieces:
                    wake = self._core.next_event_s()
                    if self._feeds:
                        wake = min(wake, self._now() + STREAM_TICK_S) if wake is not None else None
                    self._lock.wait(None if wake is None else max(0.0, wake - self._now()))
                    continue
                self._emit(pieces)  # under the lock: a request that ends meanwhile sends its last words after these
            self._resolve(finished)

    def _due_pieces(self) -> list[tuple[TextSink, str]]:
        """With the lock held: the words each streamed request generated since its last piece."""
        now = self._now()
        due = [(feed.on_text, feed.upto(self._core.progress(key, now))) for key, feed in self._feeds.items()]
        return [(sink, text) for sink, text in due if text]

    @staticmethod
    def _emit(pieces: list[tuple[TextSink, str]]) -> None:
        """Hand out pieces, the lock held (so each request's come in order); a sink must not block."""
        for on_text, text in pieces:
            on_text(text)

    def _resolve(self, keys: list[int]) -> None:
        """Set the outputs of these finished requests (never with the lock held: future callbacks run here)."""
        if not keys:
            return
        with self._lock:
            outputs = [self._pending.pop(k) for k in keys if k in self._pending]
            feeds = [self._feeds.pop(k) for k in keys if k in self._feeds]
            self._emit([(feed.on_text, feed.upto(len(feed.words))) for feed in feeds])  # the words not sent yet
        for future, output in outputs:
            if not future.cancelled():
                future.set_result(output)
