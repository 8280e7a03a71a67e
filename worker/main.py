"""Start one worker process: load the backend once, register, work its RQ queue, drain on stop."""

from __future__ import annotations

import os

import redis
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import Worker

from gpulb import keys
from gpulb.connection import broker_errors, connect
from gpulb.errors import ConfigError
from gpulb.logs import get_logger
from gpulb.settings import Settings
from worker.backends import create_backend
from worker.heartbeat import Heartbeat
from worker.rq_worker import GpulbWorker
from worker.runtime import WorkerRuntime

log = get_logger("gpulb.worker")


def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """Run a worker until SIGTERM/SIGINT (or, with ``burst``, until its queue is empty)."""
    cfg = settings.worker
    if not cfg.model:
        raise ConfigError("worker needs a model: pass --model or set GPULB_WORKER__MODEL")
    if cfg.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(cfg.gpu)  # before any backend imports CUDA
    with broker_errors(settings.redis_url):
        conn = connect(settings)
        conn.ping()
        runtime = WorkerRuntime(conn, cfg, create_backend(cfg))
        runtime.backend.start()
        _forget_dead_rq_worker(connect(settings, decode=False), runtime.worker_id)
        runtime.register()
    heartbeat = Heartbeat(runtime.heartbeat, cfg.heartbeat_s)
    heartbeat.start()
    try:
        build_rq_worker(settings, runtime).work(burst=burst, logging_level=settings.log_level.upper())
    finally:
        runtime.start_draining()
        heartbeat.stop()
        with broker_errors(settings.redis_url):
            runtime.deregister()
        runtime.backend.shutdown()


def build_rq_worker(settings: Settings, runtime: WorkerRuntime) -> GpulbWorker:
    rq_conn = connect(settings, decode=False)  # RQ expects bytes from Redis
    queue = Queue(keys.rq_queue_name(runtime.worker_id), connection=rq_conn, serializer=JSONSerializer)
    return GpulbWorker([queue], name=runtime.worker_id, connection=rq_conn, serializer=JSONSerializer, runtime=runtime)


def _forget_dead_rq_worker(rq_conn: redis.Redis, worker_id: str) -> None:
    """RQ refuses a name whose record has not expired; a dead predecessor's record is retired."""
    worker_key = Worker.redis_worker_namespace_prefix + worker_id
    if rq_conn.exists(worker_key) and not rq_conn.exists(keys.load_key(worker_id)):
        dead = Worker.find_by_key(worker_key, connection=rq_conn, serializer=JSONSerializer)
        if dead is not None:
            dead.register_death()  # type: ignore[no-untyped-call]
            log.info("retired the RQ record of a dead worker with this id", worker_id=worker_id)
