"""In-process fleet helpers over the real redis-server: workers run in burst mode, the balancer by rounds."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from balancer.dispatcher import Balancer
from gpulb import keys
from gpulb.connection import connect
from gpulb.settings import Settings
from producer import Client
from tests.conftest import make_settings
from worker.backends import create_backend
from worker.main import WorkerParts, build_rq_worker, build_worker
from worker.microbatch import Item, start_microbatch

StartWorker = Callable[..., WorkerParts]


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url) as c:
        yield c


@pytest.fixture
def start_worker(redis_url: str) -> Iterator[StartWorker]:
    started: list[WorkerParts] = []

    def start(
        worker_id: str, model: str = "m", *, tokens_per_s: float = 1e6, max_batch: int = 64, **extra: object
    ) -> WorkerParts:
        worker = {"id": worker_id, "model": model, "tokens_per_s": tokens_per_s, "max_batch": max_batch}
        top = {k: extra.pop(k) for k in list(extra) if k == "max_attempts"}
        engine = extra.pop("engine", None)
        settings = make_settings(redis_url, worker={**worker, **extra}, **top)
        worker = build_worker(
            connect(settings), connect(settings, decode=False), settings, engine or create_backend(settings.worker)
        )  # type: ignore[arg-type]
        worker.lifecycle.register()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.engine.stop_runner()
        worker.engine.backend.shutdown()


def start_running(worker: WorkerParts, microbatch_id: str) -> list[Item]:
    """What a worker does before its backend runs (the START script); returns the items it holds."""
    members = str(worker.ctx.conn.hget(keys.microbatch_key(microbatch_id), "entries")).split()
    items = start_microbatch(worker.ctx.scripts, microbatch_id, members)
    assert items is not None
    return items


def run_now(worker: WorkerParts, microbatch_id: str) -> None:
    """Run one micro-batch as its RQ job would, and wait until its results are recorded."""
    worker.execution.run_microbatch(microbatch_id)
    assert worker.engine.finish_in_flight(timeout_s=60), "requests still in the engine after 60 s"


def work(worker: WorkerParts, redis_url: str) -> None:
    """Run every queued micro-batch of this worker, in this process, and wait for its results, then return."""
    build_rq_worker(make_settings(redis_url), worker).work(burst=True)
    assert worker.engine.finish_in_flight(timeout_s=60), "requests still in the engine after 60 s"


def balancer(conn: redis.Redis, settings: Settings | None = None, **overrides: object) -> Balancer:
    base = settings or Settings(_env_file=None)  # type: ignore[call-arg]
    top = {k: overrides.pop(k) for k in list(overrides) if k == "max_attempts"}
    base = base.model_copy(update={"balancer": base.balancer.model_copy(update=overrides), **top})
    url = "redis://{host}:{port}/0".format(**conn.connection_pool.connection_kwargs)
    return Balancer(conn, redis.Redis.from_url(url), base)
