"""Start one worker process: load the backend once, register, work its RQ queue, drain on stop.

A worker is built from parts named by their jobs (:class:`WorkerParts`): the engine it runs, its health, its load
key, micro-batch execution, and its lifecycle in Redis; the RQ glue (``worker.rq_worker``) drives them.

If Redis goes away, the worker waits with bounded exponential backoff, takes back whatever it
held but can no longer run, and carries on; it exits only on SIGTERM/SIGINT (or in burst mode).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from types import FrameType

import redis

from gpulb.connection import BLIP_ERRORS, REDIS_FULL, broker_errors, connect
from gpulb.errors import BrokerUnavailable, ConfigError
from gpulb.logs import get_logger
from gpulb.metrics import serve_metrics
from gpulb.rq_books import retire_worker
from gpulb.settings import BackendName, Settings
from worker.backends import create_backend
from worker.backends.base import Backend
from worker.context import WorkerContext
from worker.engine import Engine
from worker.gpu import GpuMonitor, pin_to_gpu
from worker.health import Health
from worker.heartbeat import Heartbeat
from worker.lifecycle import Lifecycle
from worker.load import LoadReporter
from worker.metrics import WorkerMetrics
from worker.microbatch_execution import MicroBatchExecution
from worker.rq_worker import GpulbWorker, check_installed_rq

log = get_logger("gpulb.worker")
GPU_BACKENDS = frozenset({BackendName.TRANSFORMERS, BackendName.VLLM, BackendName.TENSORRT_LLM})


ENGINE_DIED_EXIT = 3


@dataclass(frozen=True)
class WorkerParts:
    ctx: WorkerContext
    engine: Engine
    health: Health
    load: LoadReporter
    execution: MicroBatchExecution
    lifecycle: Lifecycle


def build_worker(
    conn: redis.Redis, rq_conn: redis.Redis, settings: Settings, backend: Backend,
    gpu_monitor: GpuMonitor | None = None, metrics: WorkerMetrics | None = None,
) -> WorkerParts:  # fmt: skip
    """The parts of one worker, wired together (nothing is sent to Redis yet)."""
    ctx = WorkerContext.of(conn, rq_conn, settings)
    engine = Engine(ctx, backend)
    health = Health(engine)
    load = LoadReporter(ctx, engine, health, gpu_monitor, metrics)
    execution = MicroBatchExecution(ctx, engine, health, load, metrics)
    return WorkerParts(ctx, engine, health, load, execution, Lifecycle(ctx, engine, health, load, execution))


def run_worker(settings: Settings, *, burst: bool = False) -> int:
    """Run a worker until SIGTERM/SIGINT (or, with ``burst``, until its queue is empty); returns the exit code:
    0, or 3 when its engine died for good (a supervisor then starts a fresh worker)."""
    cfg = settings.worker
    if not cfg.model:
        raise ConfigError("worker needs a model: pass --model or set GPULB_WORKER__MODEL")
    check_installed_rq()
    if cfg.gpu is not None:
        pin_to_gpu(cfg.gpu)  # before any backend imports CUDA
    monitor = GpuMonitor() if cfg.gpu is not None or cfg.backend in GPU_BACKENDS else None
    backend = create_backend(cfg)
    metrics = WorkerMetrics(cfg.resolved_id(), cfg.model) if settings.metrics_port is not None else None
    worker = build_worker(connect(settings), connect(settings, decode=False), settings, backend, monitor, metrics)
    if metrics is not None and settings.metrics_port is not None:
        serve_metrics(metrics.registry, settings.metrics_port)
    with broker_errors(settings.redis_url):
        worker.ctx.conn.ping()
        backend.start()
        _register(worker, settings)
    heartbeat = Heartbeat(worker.lifecycle.beat, cfg.heartbeat_s)
    heartbeat.start()
    try:
        while not _work(settings, worker, burst) and not worker.health.draining:
            _wait_for_redis(worker, settings)
            if worker.health.draining:
                break
    finally:
        _shut_down(settings, worker, heartbeat)
    return ENGINE_DIED_EXIT if worker.health.engine_died else 0


def _register(worker: WorkerParts, settings: Settings) -> None:
    """Register; a full Redis is waited out, as at any other time (an unreachable one fails the start)."""
    delay = 0.1
    while True:
        try:
            worker.lifecycle.register()
            return
        except REDIS_FULL:
            log.warning("redis is full (maxmemory, noeviction): waiting to register", retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, settings.redis.max_backoff_s)


def build_rq_worker(settings: Settings, worker: WorkerParts) -> GpulbWorker:
    return GpulbWorker.on_own_queue(
        worker.engine, worker.health, worker.execution, max_connection_wait_s=settings.redis.max_backoff_s
    )


def _work(settings: Settings, worker: WorkerParts, burst: bool) -> bool:
    """Run RQ's work loop; True if it ended as asked (burst done or stop requested)."""
    try:
        retire_worker(worker.ctx.rq_conn, worker.ctx.worker_id)  # our own record from before an outage
        build_rq_worker(settings, worker).work(burst=burst, logging_level=settings.log_level.upper())
    except BLIP_ERRORS as exc:  # lost, or full (maxmemory): wait for it, take back what we hold, carry on
        log.warning("lost redis", error=str(exc))
        return False
    return burst or worker.health.draining


def _wait_for_redis(worker: WorkerParts, settings: Settings) -> None:
    """Back off (bounded, exponential) until Redis answers, then take back orphaned micro-batches."""
    stopping = worker.ctx.stopping

    def stop(signum: int, frame: FrameType | None) -> None:
        worker.health.start_draining()
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    delay = 0.1
    while not worker.health.draining:
        try:
            worker.ctx.conn.ping()
            recovered = worker.lifecycle.recover_orphans()
            log.info("redis is back", requeued=recovered.requests)
            return
        except redis.RedisError as exc:
            log.warning("waiting for redis", error=str(exc), retry_in_s=delay)
            stopping.wait(delay)
            delay = min(delay * 2, settings.redis.max_backoff_s)


def _shut_down(settings: Settings, worker: WorkerParts, heartbeat: Heartbeat) -> None:
    worker.health.start_draining()
    heartbeat.poke()  # the balancer stops sending at once
    if not worker.engine.finish_in_flight(timeout_s=settings.worker.drain_timeout_s):  # heartbeats go on meanwhile
        log.warning("requests still running at the end of the drain: handed back to the ingress")
    heartbeat.stop()
    try:
        with broker_errors(settings.redis_url):
            worker.lifecycle.deregister()
    except BrokerUnavailable as exc:  # our load key expires; the balancer takes our work back
        log.warning("could not deregister", error=str(exc))
    worker.ctx.stopping.set()
    worker.engine.stop_runner()
    worker.engine.backend.shutdown()
