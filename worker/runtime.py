"""What a worker does with Redis: register, run micro-batches, publish load, drain, deregister."""

from __future__ import annotations

import os
import socket
import time

import redis
import structlog

from gpulb import keys
from gpulb.errors import WorkerIdInUse
from gpulb.logs import get_logger
from gpulb.models import Result, WorkerLoad, WorkerState
from gpulb.scripts import Scripts
from gpulb.settings import WorkerSettings
from worker.backends.base import Backend, BackendOutput, BackendRequest
from worker.microbatch import Item, load_items, mark_started, record_arguments

log = get_logger("gpulb.worker")


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


class WorkerRuntime:
    """The state of one worker process; the RQ job function calls :meth:`run_microbatch`."""

    def __init__(self, conn: redis.Redis, settings: WorkerSettings, backend: Backend) -> None:
        if not settings.model:
            raise ValueError("worker settings need a model")
        self.conn = conn
        self.settings = settings
        self.worker_id = settings.resolved_id()
        self.model: str = settings.model
        self.backend = backend
        self.scripts = Scripts(conn)
        self.meter = ThroughputMeter(settings.ema_alpha)
        self.state = WorkerState.STARTING
        self.running = 0
        self.queued = 0

    # -- load key -------------------------------------------------------------------------------

    def load_report(self) -> WorkerLoad:
        return WorkerLoad(
            worker_id=self.worker_id,
            model=self.model,
            backend=self.backend.name,
            state=self.state,
            capacity=self.settings.max_batch,
            running=self.running,
            queued=self.queued,
            tokens_per_s=round(self.meter.tokens_per_s, 3),
            host=socket.gethostname(),
            pid=os.getpid(),
            gpu=-1 if self.settings.gpu is None else self.settings.gpu,
        )

    def publish_load(self, pipe: redis.client.Pipeline | None = None) -> None:
        own = pipe is None
        target = self.conn.pipeline(transaction=False) if pipe is None else pipe
        target.hset(keys.load_key(self.worker_id), mapping=self.load_report().to_hash())  # type: ignore[arg-type]
        target.expire(keys.load_key(self.worker_id), int(max(1, self.settings.load_ttl_s)))
        if own:
            target.execute()

    def heartbeat(self) -> None:
        """Refresh the load key; called from the heartbeat thread, also while a batch runs."""
        self.queued = int(self.conn.llen(keys.rq_queue_key(self.worker_id)))
        self.publish_load()

    # -- lifecycle ------------------------------------------------------------------------------

    def register(self) -> None:
        """Claim the worker id and announce the worker as idle. Refuses an id a live worker holds."""
        if self.conn.exists(keys.load_key(self.worker_id)):
            raise WorkerIdInUse(
                f"worker id {self.worker_id!r} is in use by a live worker (its load key exists); "
                "pick another --id or stop that worker"
            )
        self.state = WorkerState.IDLE
        pipe = self.conn.pipeline(transaction=False)
        self.publish_load(pipe)
        pipe.sadd(keys.workers_key(), self.worker_id)
        pipe.sadd(keys.models_key(), self.model)
        pipe.rpush(keys.wakeup_key(), self.worker_id)
        pipe.ltrim(keys.wakeup_key(), -keys.WAKEUP_KEEP, -1)
        pipe.execute()
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        log.info("worker registered", model=self.model, backend=self.backend.name, capacity=self.settings.max_batch)

    def start_draining(self) -> None:
        self.state = WorkerState.DRAINING

    def _set_busy(self, running: int) -> None:
        self.running = running
        if self.state is not WorkerState.DRAINING:
            self.state = WorkerState.BUSY if running else WorkerState.IDLE

    def release_queued(self) -> int:
        """Hand every queued (not started) micro-batch back to the ingress; returns requests released."""
        released = 0
        queued: list[str] = self.conn.lrange(keys.rq_queue_key(self.worker_id), 0, -1)  # type: ignore[assignment]
        for microbatch_id in queued:
            mb = self.conn.hget(keys.microbatch_key(microbatch_id), "model")
            released += int(
                self.scripts.release(
                    keys=[
                        keys.rq_queue_key(self.worker_id),
                        keys.microbatch_key(microbatch_id),
                        keys.inflight_key(self.worker_id),
                        keys.credit_key(self.worker_id),
                        keys.rq_job_key(microbatch_id),
                        keys.ingress_key(str(mb or self.model)),
                        keys.ingress_tokens_key(str(mb or self.model)),
                        keys.wakeup_key(),
                    ],
                    args=[microbatch_id, keys.WAKEUP_KEEP],
                )
            )
        return released

    def deregister(self) -> None:
        """Stop being a target: mark draining, hand back queued work, remove the load key."""
        self.start_draining()
        self.publish_load()
        released = self.release_queued()
        pipe = self.conn.pipeline(transaction=False)
        pipe.delete(keys.load_key(self.worker_id))
        pipe.srem(keys.workers_key(), self.worker_id)
        pipe.execute()
        log.info("worker deregistered", released_requests=released)

    # -- work -----------------------------------------------------------------------------------

    def run_microbatch(self, microbatch_id: str) -> dict[str, int]:
        """Run one micro-batch as one backend batch and record each result once."""
        members_raw = self.conn.hget(keys.microbatch_key(microbatch_id), "entries")
        if members_raw is None:
            log.warning("micro-batch no longer owned by this worker, skipped", microbatch_id=microbatch_id)
            return {"requests": 0, "recorded": 0}
        items = load_items(self.conn, str(members_raw).split())
        mark_started(self.conn, items)
        self._set_busy(sum(1 for i in items if i.runnable))
        started_at = time.time()
        outputs = self._generate(items)
        finished_at = time.time()
        results = self._results(items, outputs, started_at, finished_at)
        recorded = self._record(microbatch_id, items, results, finished_at)
        work = sum(i.cost for i in items if i.runnable)
        self.meter.observe(work, finished_at - started_at)
        log.info(
            "micro-batch done",
            microbatch_id=microbatch_id,
            requests=len(items),
            recorded=recorded,
            tokens=work,
            elapsed_s=round(finished_at - started_at, 4),
            tokens_per_s=round(self.meter.tokens_per_s, 1),
        )
        return {"requests": len(items), "recorded": recorded}

    def _generate(self, items: list[Item]) -> dict[int, BackendOutput]:
        runnable = [(p, i) for p, i in enumerate(items) if i.runnable and i.payload is not None]
        requests = [
            BackendRequest(prompt=i.payload.prompt, max_tokens=i.payload.max_tokens, sampling=i.payload.sampling)
            for _, i in runnable
            if i.payload is not None
        ]
        if not requests:
            return {}
        try:
            outputs = self.backend.generate(requests)
            if len(outputs) != len(requests):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(requests)} requests")
        except Exception as exc:  # the whole batch failed: every request gets the error, none is lost
            log.exception("backend failed on a micro-batch", requests=len(requests))
            message = f"{type(exc).__name__}: {exc}"
            outputs = [BackendOutput(text="", output_tokens=0, error=message) for _ in requests]
        return {p: out for (p, _), out in zip(runnable, outputs, strict=True)}

    def _results(
        self, items: list[Item], outputs: dict[int, BackendOutput], started_at: float, finished_at: float
    ) -> dict[int, Result]:
        results: dict[int, Result] = {}
        for position, item in enumerate(items):
            if item.already_done:
                continue
            out = outputs.get(position) or BackendOutput(text="", output_tokens=0, error=item.problem)
            results[position] = Result(
                request_id=keys.request_id(item.batch_id, item.index),
                index=item.index,
                text=out.text,
                output_tokens=out.output_tokens,
                worker=self.worker_id,
                error=out.error,
                attempts=item.attempt + 1,
                submitted_at=item.submitted_at,
                started_at=started_at,
                finished_at=finished_at,
            )
        return results

    def _record(self, microbatch_id: str, items: list[Item], results: dict[int, Result], now: float) -> int:
        script_keys, args = record_arguments(microbatch_id, self.worker_id, now, items, results)
        self._set_busy(0)
        pipe = self.conn.pipeline(transaction=False)
        self.scripts.record(keys=script_keys, args=args, client=pipe)
        self.publish_load(pipe)
        return int(pipe.execute()[0])
