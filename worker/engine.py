"""The backend as one worker runs it: its slots, the runner that keeps a continuous engine full, its speed, and the
requests in it now."""

from __future__ import annotations

import time

from worker.backends.base import Backend, ContinuousBackend, EngineLoad
from worker.context import WorkerContext
from worker.execution import ExecutionPolicy, IsolatingExecutor
from worker.runner import Runner, Sink, engine_slots, expected_seconds
from worker.speed import EngineSpeed
from worker.streaming import TextStreams

DEFAULT_SLOTS = 128  # a continuous engine that cannot tell its slots (vLLM's max_num_seqs on a GPU is 256-1024)
ROOM_WAIT_S = 5.0  # the RQ worker waits this long for a free slot between its own heartbeats


class ThroughputMeter:
    """EMA of the worker's throughput in cost tokens per second; 0 until the first batch."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.tokens_per_s = 0.0

    def observe(self, tokens: int, elapsed_s: float) -> None:
        if tokens <= 0 or elapsed_s <= 0:
            return
        sample = tokens / elapsed_s
        first = self.tokens_per_s == 0.0
        self.tokens_per_s = sample if first else self.alpha * sample + (1 - self.alpha) * self.tokens_per_s


class Engine:
    """A static backend runs each micro-batch as one engine batch (``executor``); a continuous one gets a
    :class:`worker.runner.Runner` once the worker registers (the engine knows its slots then), which keeps its slots
    full and hands each result to the sink as its request ends."""

    def __init__(self, ctx: WorkerContext, backend: Backend) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        self.backend = backend
        self.policy = ExecutionPolicy(ctx.settings.max_attempts, cfg.retry_backoff_s, cfg.min_call_timeout_s,
                                      cfg.call_timeout_factor)  # fmt: skip
        self.executor = IsolatingExecutor(backend, self.policy, ctx.stopping)
        self.meter = ThroughputMeter(cfg.ema_alpha)
        self.runner: Runner | None = None
        self.streams: TextStreams | None = None  # streamed requests' text (continuous backends)
        self.slots = 0
        self.queue_slots = 0
        self.speed: EngineSpeed | None = None
        self.running = 0  # requests of the micro-batch a static engine runs now

    def start_runner(self, sink: Sink) -> None:
        """A continuous backend's runner, once (a static backend has none)."""
        if not isinstance(self.backend, ContinuousBackend) or self.runner is not None:
            return
        cfg = self.ctx.cfg
        self.slots = engine_slots(self.backend, cfg.slots, DEFAULT_SLOTS)
        self.queue_slots = cfg.queue_slots if cfg.queue_slots is not None else max(1, self.slots // 4)
        self.speed = EngineSpeed(self.slots)
        self.streams = TextStreams(self.ctx.conn)
        self.runner = Runner(self.backend, sink, self.policy, slots=self.slots, worker_id=self.ctx.worker_id,
                             expected_s=expected_seconds(lambda: self.tokens_per_s, self.slots),
                             streams=self.streams)  # fmt: skip

    @property
    def in_flight(self) -> int:
        """Requests in the engine now."""
        return self.runner.in_engine if self.runner is not None else self.running

    @property
    def tokens_per_s(self) -> float:
        """Measured speed: generated tokens/s of a full engine (continuous), cost tokens/s (static)."""
        return self.speed.tokens_per_s if self.speed is not None else self.meter.tokens_per_s

    def sample_speed(self, figures: EngineLoad) -> None:
        """A continuous engine's speed sample, from its own token counter if it has one."""
        if self.speed is not None and self.runner is not None:
            generated = figures.generated_tokens
            self.speed.sample(time.monotonic(), generated if generated is not None else self.runner.output_tokens,
                              self.runner.busy_slot_seconds())  # fmt: skip

    def admitted(self) -> frozenset[str]:
        """The micro-batches whose requests are in the runner."""
        return self.runner.active() if self.runner is not None else frozenset()

    def wait_for_room(self, timeout_s: float = ROOM_WAIT_S) -> bool:
        """True once the engine has a free slot for the next micro-batch (a static engine always has)."""
        return self.runner is None or self.runner.wait_for_room(timeout_s)

    def finish_in_flight(self, timeout_s: float | None = None) -> bool:
        """Wait until every admitted micro-batch is recorded (or handed back)."""
        return self.runner is None or self.runner.wait_idle(timeout_s)

    def stop_runner(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self.streams is not None:
            self.streams.stop()
