"""The worker's load key: what the balancer reads to place work (state, slots, queue, speed, engine and GPU
figures), refreshed by the heartbeat and with every record of results."""

from __future__ import annotations

import os
import socket
from typing import Any

import redis

from gpulb import keys
from gpulb.logs import get_logger
from gpulb.models import WorkerLoad
from worker.backends.base import EngineLoad
from worker.context import WorkerContext
from worker.engine import Engine
from worker.gpu import GpuMonitor, GpuSample
from worker.health import Health
from worker.metrics import WorkerMetrics

log = get_logger("gpulb.worker")


class LoadReporter:
    def __init__(
        self, ctx: WorkerContext, engine: Engine, health: Health, gpu_monitor: GpuMonitor | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:  # fmt: skip
        self.ctx, self.engine, self.health = ctx, engine, health
        self.gpu_monitor, self.metrics = gpu_monitor, metrics
        self.figures = EngineLoad()  # what the engine said of itself at the last heartbeat
        self.gpu = GpuSample(None, None, None)
        self.queued = 0  # micro-batches in the worker's RQ queue at the last heartbeat

    def report(self) -> WorkerLoad:
        ctx, cfg, engine = self.ctx, self.ctx.cfg, self.engine
        return WorkerLoad(
            worker_id=ctx.worker_id, model=ctx.model, backend=engine.backend.name, state=self.health.state,
            capacity=cfg.max_batch, slots=engine.slots, queue_slots=engine.queue_slots, running=engine.in_flight,
            queued=self.queued, tokens_per_s=round(engine.tokens_per_s, 3), host=socket.gethostname(), pid=os.getpid(),
            gpu=-1 if cfg.gpu is None else cfg.gpu, **self._engine_fields(),
        )  # fmt: skip

    def _engine_fields(self) -> dict[str, Any]:
        reported = {
            "engine_running": self.figures.running, "engine_waiting": self.figures.waiting,
            "kv_cache_usage": self.figures.kv_cache_usage, "generated_tokens": self.figures.generated_tokens,
            "gpu_util": self.gpu.util_percent, "gpu_mem_used_mb": self.gpu.mem_used_mb,
            "gpu_mem_total_mb": self.gpu.mem_total_mb,
        }  # fmt: skip
        return {name: round(value, 4) for name, value in reported.items() if value is not None}

    def refresh_engine_status(self) -> None:
        """Ask the engine and NVML how they are (heartbeat thread only: these calls may be slow)."""
        backend = self.engine.backend
        try:
            self.health.engine_ok = backend.healthy()
            self.figures = backend.engine_load()
        except Exception as exc:
            self.health.engine_ok, self.figures = False, EngineLoad()
            log.warning("backend health check failed", error=f"{type(exc).__name__}: {exc}")
        if self.gpu_monitor is not None:
            self.gpu = self.gpu_monitor.sample()
        self.engine.sample_speed(self.figures)

    def publish(self, pipe: redis.client.Pipeline | None = None) -> None:
        """Write the load key (on ``pipe`` if given, else in a round trip of its own)."""
        target = self.ctx.conn.pipeline(transaction=False) if pipe is None else pipe
        report = self.report()
        load_key = keys.load_key(self.ctx.worker_id)
        target.hset(load_key, mapping=report.to_hash())  # type: ignore[arg-type]
        if self.metrics is not None:
            self.metrics.observe_load(report)
        target.pexpire(load_key, int(self.ctx.cfg.load_ttl_s * 1000))
        target.sadd(keys.workers_key(), self.ctx.worker_id)  # a worker declared dead that resumes comes back
        if pipe is None:
            target.execute()
