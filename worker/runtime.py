"""What a worker does with Redis: register, run micro-batches, publish load, drain, deregister."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import structlog

from gpulb import keys
from gpulb.connection import (
    CONNECTION_ERRORS,
    REDIS_FULL,
    check_durable_acks,
    confirm_durable,
    count_stat,
    durable,
    queue_durable_wait,
)
from gpulb.errors import NotDurable, WorkerIdInUse
from gpulb.logs import get_logger
from gpulb.models import Result, WorkerLoad, WorkerState, refill_batch
from gpulb.recovery import Requeued, RequeueMode, recover_worker, requeue_microbatch
from gpulb.rq_books import retire_worker
from gpulb.scripts import Scripts
from gpulb.settings import Settings
from worker.backends.base import Backend, BackendRequest, ContinuousBackend, EngineLoad, EngineUnavailable, failed
from worker.execution import ExecutionPolicy, IsolatingExecutor, Outcome
from worker.gpu import GpuMonitor, GpuSample
from worker.metrics import WorkerMetrics
from worker.microbatch import Item, Settled, StartCall, apply_start, record_call, start_call, start_microbatch
from worker.runner import Flight, Recording, Runner, Sink, engine_slots, expected_seconds
from worker.speed import EngineSpeed
from worker.streaming import TextStreams

log = get_logger("gpulb.worker")
T = TypeVar("T")

CANCELLED = "cancelled"
ORPHAN_SWEEP_BEATS = 30  # heartbeats between two sweeps for orphaned micro-batches
DEFAULT_SLOTS = 128  # a continuous engine that cannot tell its slots (vLLM's max_num_seqs on a GPU is 256-1024)
ROOM_WAIT_S = 5.0  # the RQ worker waits this long for a free slot between its own heartbeats
ID_CLAIM_S = 30  # the longest a registering worker holds its id's claim key; once registered, its load key does


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


class WorkerRuntime(Sink):
    """The state of one worker process; the RQ job function calls :meth:`run_microbatch`.

    A static backend runs each micro-batch as one engine batch, the RQ job waiting for it. A continuous
    backend gets a :class:`worker.runner.Runner`: the RQ job only admits the micro-batch, whose requests are
    recorded as each ends, and the RQ worker takes the next micro-batch as soon as the engine has a free slot.
    """

    def __init__(
        self, conn: redis.Redis, rq_conn: redis.Redis, settings: Settings, backend: Backend,
        gpu_monitor: GpuMonitor | None = None, metrics: WorkerMetrics | None = None,
    ) -> None:  # fmt: skip
        cfg = settings.worker
        if not cfg.model:
            raise ValueError("worker settings need a model")
        self.conn, self.rq_conn = conn, rq_conn
        self.settings, self.cfg = settings, cfg
        self.worker_id = cfg.resolved_id()
        self.model: str = cfg.model
        self.backend = backend
        self.scripts = Scripts(conn)
        self.meter = ThroughputMeter(cfg.ema_alpha)
        self.stopping = threading.Event()
        policy = ExecutionPolicy(settings.max_attempts, cfg.retry_backoff_s, cfg.min_call_timeout_s,
                                 cfg.call_timeout_factor)  # fmt: skip
        self.policy = policy
        self.executor = IsolatingExecutor(backend, policy, self.stopping)
        self.runner: Runner | None = None  # continuous backends, from register() (the engine knows its slots then)
        self.streams: TextStreams | None = None  # streamed requests' text (continuous backends)
        self.slots = 0
        self.queue_slots = 0
        self.speed: EngineSpeed | None = None
        self.state = WorkerState.STARTING
        self.engine_ok = True
        self.engine = EngineLoad()
        self.gpu_monitor = gpu_monitor
        self.gpu = GpuSample(None, None, None)
        self.metrics = metrics
        self.running = 0
        self.queued = 0
        self.current_microbatch: str | None = None
        self.engine_died = False  # the backend says its engine cannot come back: the worker exits with code 3
        self._prepared: tuple[str, list[Item] | None] | None = None  # started by the RQ worker's pipeline
        self._beats = 0
        self._orphan_suspects: frozenset[str] = frozenset()  # micro-batches that looked orphaned at the last sweep
        self._redis_run_id: str | None = None  # changes when Redis restarts
        self._prompt_sweeps = 0  # sweeps due at the next beats, whatever ORPHAN_SWEEP_BEATS says

    # -- load key -------------------------------------------------------------------------------

    def load_report(self) -> WorkerLoad:
        return WorkerLoad(
            worker_id=self.worker_id, model=self.model, backend=self.backend.name, state=self.state,
            capacity=self.cfg.max_batch, slots=self.slots, queue_slots=self.queue_slots, running=self.in_flight,
            queued=self.queued, tokens_per_s=round(self.tokens_per_s, 3), host=socket.gethostname(), pid=os.getpid(),
            gpu=-1 if self.cfg.gpu is None else self.cfg.gpu, **self._engine_fields(),
        )  # fmt: skip

    @property
    def in_flight(self) -> int:
        """Requests in the engine now."""
        return self.runner.in_engine if self.runner is not None else self.running

    @property
    def tokens_per_s(self) -> float:
        """Measured speed: generated tokens/s of a full engine (continuous), cost tokens/s (static)."""
        return self.speed.tokens_per_s if self.speed is not None else self.meter.tokens_per_s

    def _engine_fields(self) -> dict[str, Any]:
        reported = {
            "engine_running": self.engine.running, "engine_waiting": self.engine.waiting,
            "kv_cache_usage": self.engine.kv_cache_usage, "generated_tokens": self.engine.generated_tokens,
            "gpu_util": self.gpu.util_percent, "gpu_mem_used_mb": self.gpu.mem_used_mb,
            "gpu_mem_total_mb": self.gpu.mem_total_mb,
        }  # fmt: skip
        return {name: round(value, 4) for name, value in reported.items() if value is not None}

    def refresh_engine_status(self) -> None:
        """Ask the engine and NVML how they are (heartbeat thread only: these calls may be slow)."""
        try:
            self.engine_ok = self.backend.healthy()
            self.engine = self.backend.engine_load()
        except Exception as exc:
            self.engine_ok, self.engine = False, EngineLoad()
            log.warning("backend health check failed", error=f"{type(exc).__name__}: {exc}")
        if self.gpu_monitor is not None:
            self.gpu = self.gpu_monitor.sample()
        if self.speed is not None and self.runner is not None:
            generated = self.engine.generated_tokens
            self.speed.sample(time.monotonic(), generated if generated is not None else self.runner.output_tokens,
                              self.runner.busy_slot_seconds())  # fmt: skip

    def publish_load(self, pipe: redis.client.Pipeline | None = None) -> None:
        target = self.conn.pipeline(transaction=False) if pipe is None else pipe
        report = self.load_report()
        target.hset(keys.load_key(self.worker_id), mapping=report.to_hash())  # type: ignore[arg-type]
        if self.metrics is not None:
            self.metrics.observe_load(report)
        target.pexpire(keys.load_key(self.worker_id), int(self.cfg.load_ttl_s * 1000))
        target.sadd(keys.workers_key(), self.worker_id)  # a worker declared dead that resumes comes back
        if pipe is None:
            target.execute()

    def heartbeat(self) -> None:
        """Refresh the load key; called from the heartbeat thread, also while a batch runs.

        Every ``ORPHAN_SWEEP_BEATS`` beats it also takes back micro-batches this worker holds but
        will never run (neither queued nor running: a start or a give-back that Redis refused).
        """
        pipe = self.conn.pipeline(transaction=False)
        pipe.llen(keys.rq_queue_key(self.worker_id))
        pipe.info("server")
        queued, server = pipe.execute(raise_on_error=False)
        if isinstance(queued, Exception):
            raise queued
        self.queued = int(queued)
        self._notice_restart(server)
        if self.state is WorkerState.STARTING:
            return
        self.refresh_engine_status()
        if self._update_health():
            log.warning("engine unhealthy: taking no new work")
        if self.backend.dead() and not self.engine_died:
            self.engine_died = True  # queued work goes back below; the process stops, to be started afresh
            log.error("engine died for good: handing work back and stopping the worker (exit code 3)")
            os.kill(os.getpid(), signal.SIGTERM)
        self.publish_load()
        if self.state is WorkerState.UNHEALTHY and self.queued:  # every beat: the state may have changed elsewhere
            released = self.release_queued()
            log.warning("engine unhealthy: queued work handed back", released_requests=released)
        self._beats += 1
        due = self._prompt_sweeps > 0 or self._beats % ORPHAN_SWEEP_BEATS == 0
        if due and self.state is not WorkerState.DRAINING:
            self._prompt_sweeps = max(0, self._prompt_sweeps - 1)
            swept = self.sweep_orphans()
            if swept.microbatches:
                log.warning("took back orphaned micro-batches", requeued=swept.requests)

    def _notice_restart(self, server_info: object) -> None:
        """A Redis that restarted may have come back from an older state (the last second of an ``everysec`` AOF
        lost in a power cut): a micro-batch this worker finished may be held again, with nothing to run it. Sweep
        at this beat and the next, so that it is back in the ingress in about one heartbeat, not one minute."""
        if not isinstance(server_info, dict):  # INFO refused (an ACL without it): no restart detection
            return
        run_id = str(server_info.get("run_id", ""))
        if self._redis_run_id is not None and run_id != self._redis_run_id:
            log.warning("redis restarted: looking for micro-batches it holds that nothing here runs")
            self._prompt_sweeps = 2
        self._redis_run_id = run_id

    # -- lifecycle ------------------------------------------------------------------------------

    def register(self) -> Requeued:
        """Claim the worker id, take back what a dead predecessor of this id held, announce idle."""
        check_durable_acks(self.conn, self.settings)
        self._wait_for_predecessor()
        retire_worker(self.rq_conn, self.worker_id)
        recovered = recover_worker(self.conn, self.rq_conn, self.scripts, self.worker_id,
                                   max_attempts=self.settings.max_attempts)  # fmt: skip
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        self._start_runner()
        self.refresh_engine_status()
        self.state = WorkerState.IDLE
        self._update_health()
        pipe = self.conn.pipeline(transaction=False)
        self.scripts.queue_loads(pipe)
        self.publish_load(pipe)
        pipe.sadd(keys.models_key(), self.model)
        pipe.sadd(keys.rq_queues_key(), keys.rq_queue_key(self.worker_id))  # `rq info` lists the queue at once
        pipe.rpush(keys.wakeup_key(), keys.wake_worker_token(self.worker_id))
        pipe.ltrim(keys.wakeup_key(), -keys.WAKEUP_KEEP, -1)
        pipe.delete(keys.worker_claim_key(self.worker_id))  # the load key guards the id from now on
        pipe.info("server")
        replies = pipe.execute(raise_on_error=False)
        if error := next((r for r in replies[:-1] if isinstance(r, Exception)), None):
            raise error
        self._notice_restart(replies[-1])
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        log.info("worker registered", model=self.model, backend=self.backend.name, capacity=self.cfg.max_batch,
                 slots=self.slots, queue_slots=self.queue_slots, recovered_requests=recovered.requests)  # fmt: skip
        return recovered

    def _start_runner(self) -> None:
        if not isinstance(self.backend, ContinuousBackend) or self.runner is not None:
            return
        self.slots = engine_slots(self.backend, self.cfg.slots, DEFAULT_SLOTS)
        queue_slots = self.cfg.queue_slots
        self.queue_slots = queue_slots if queue_slots is not None else max(1, self.slots // 4)
        self.speed = EngineSpeed(self.slots)
        self.streams = TextStreams(self.conn)
        self.runner = Runner(self.backend, self, self.policy, slots=self.slots, worker_id=self.worker_id,
                             expected_s=expected_seconds(lambda: self.tokens_per_s, self.slots),
                             streams=self.streams)  # fmt: skip

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

    def _wait_for_predecessor(self) -> None:
        """Claim the id, then look at its load key: a live worker's refuses, a dead one's is waited out (at once if
        its pid is gone on this host). Of workers racing for one id, exactly one gets past; the others refuse."""
        deadline: float | None = None  # a load key still refreshed a TTL after we first saw it is a live worker's
        while (blocker := self._claim_id()) is not None:
            if blocker == "load key":
                deadline = deadline or time.monotonic() + self.cfg.load_ttl_s + 1
                if time.monotonic() > deadline:
                    raise WorkerIdInUse(
                        f"worker id {self.worker_id!r} is in use by a live worker (its load key keeps being "
                        "refreshed); pick another --id or stop that worker"
                    )
            self.stopping.wait(0.25)

    def _claim_id(self) -> str | None:
        """None once the id is ours (SET NX of its claim key, then no live load key); else what holds it."""
        claim, load = keys.worker_claim_key(self.worker_id), keys.load_key(self.worker_id)
        if not self.conn.set(claim, f"{socket.gethostname()}:{os.getpid()}", nx=True, ex=ID_CLAIM_S):
            self._drop_dead_claim(claim)
            return "claim"  # another worker is registering under this id
        raw: dict[str, str] = self.conn.hgetall(load)  # type: ignore[assignment]
        if not raw:
            return None
        if _gone_here(raw.get("host", ""), raw.get("pid", "")):
            self.conn.delete(load)  # our host, its process is gone
            return None
        self.conn.delete(claim)
        return "load key"

    def _drop_dead_claim(self, claim: str) -> None:
        """Delete a claim whose holder was a process of this host that is gone (checked and deleted atomically)."""
        with self.conn.pipeline() as pipe, contextlib.suppress(redis.WatchError):
            pipe.watch(claim)  # type: ignore[no-untyped-call]
            host, _, pid = str(pipe.get(claim) or "").rpartition(":")
            if _gone_here(host, pid):
                pipe.multi()
                pipe.delete(claim)
                pipe.execute()

    def start_draining(self) -> None:
        self.state = WorkerState.DRAINING

    @property
    def draining(self) -> bool:
        return self.state is WorkerState.DRAINING

    def _set_busy(self, running: int) -> None:
        self.running = running
        self._update_health()

    def _update_health(self) -> bool:
        """Set the state from running count and engine health; True if the engine just went unhealthy."""
        if self.state in (WorkerState.DRAINING, WorkerState.STARTING):
            return False
        was = self.state
        if not self.engine_ok:
            self.state = WorkerState.UNHEALTHY
        else:
            self.state = WorkerState.BUSY if self.in_flight else WorkerState.IDLE
        if was is WorkerState.UNHEALTHY and self.state is not WorkerState.UNHEALTHY:
            log.info("engine healthy again: taking work")
        return self.state is WorkerState.UNHEALTHY and was is not WorkerState.UNHEALTHY

    def release_queued(self) -> int:
        """Hand every queued (not started) micro-batch back to the front of the ingress."""
        released = 0
        queued: list[str] = self.conn.lrange(keys.rq_queue_key(self.worker_id), 0, -1)  # type: ignore[assignment]
        for microbatch_id in queued:
            moved, _ = requeue_microbatch(
                self.conn, self.scripts, self.worker_id, microbatch_id, mode=RequeueMode.RELEASE,
                max_attempts=self.settings.max_attempts, reason="released",
            )  # fmt: skip
            released += moved.requests
        return released

    def sweep_orphans(self) -> Requeued:
        """Take back the micro-batches that looked orphaned at this sweep and the one before.

        One seen once may be between the RQ worker's BLMOVE and its start (neither queued nor current
        yet); a real orphan stays one.
        """
        current = self.current_microbatch
        inflight: set[str] = self.conn.smembers(keys.inflight_key(self.worker_id))  # type: ignore[assignment]
        queued: list[str] = self.conn.lrange(keys.rq_queue_key(self.worker_id), 0, -1)  # type: ignore[assignment]
        suspects = frozenset(inflight - set(queued) - {current} - self._admitted())
        confirmed, self._orphan_suspects = suspects & self._orphan_suspects, suspects
        if not confirmed:
            return Requeued()
        running = self.current_microbatch  # it may have started since
        keep = self._admitted() | ({running} if running else set())
        return recover_worker(self.conn, self.rq_conn, self.scripts, self.worker_id,
                              max_attempts=self.settings.max_attempts, only=confirmed,
                              keep=frozenset(keep))  # fmt: skip

    def _admitted(self) -> frozenset[str]:
        return self.runner.active() if self.runner is not None else frozenset()

    def recover_orphans(self, keep: frozenset[str] = frozenset()) -> Requeued:
        """After an outage: take back micro-batches we hold but will never run (not queued, not running)."""
        queued: list[str] = self.conn.lrange(keys.rq_queue_key(self.worker_id), 0, -1)  # type: ignore[assignment]
        return recover_worker(self.conn, self.rq_conn, self.scripts, self.worker_id,
                              max_attempts=self.settings.max_attempts,
                              keep=frozenset(queued) | keep | self._admitted())  # fmt: skip

    def deregister(self) -> None:
        """Stop being a target: mark draining, hand back queued work, remove the load key."""
        self.start_draining()
        self.publish_load()
        released = self.release_queued()
        orphans = recover_worker(
            self.conn, self.rq_conn, self.scripts, self.worker_id, max_attempts=self.settings.max_attempts
        )  # the drain waited for what ran: what is left is orphaned (or dies with this process)
        released += orphans.requests
        pipe = self.conn.pipeline(transaction=False)
        pipe.delete(keys.load_key(self.worker_id))
        pipe.srem(keys.workers_key(), self.worker_id)
        pipe.srem(keys.rq_queues_key(), keys.rq_queue_key(self.worker_id))
        pipe.execute()
        log.info("worker deregistered", released_requests=released)

    # -- work -----------------------------------------------------------------------------------

    def run_microbatch(self, microbatch_id: str) -> dict[str, int]:
        """Run one micro-batch as one backend batch and record each result once."""
        self.current_microbatch = microbatch_id
        try:
            with structlog.contextvars.bound_contextvars(microbatch_id=microbatch_id):
                return self._start_and_run(microbatch_id)
        except EngineUnavailable as exc:
            log.warning("engine unavailable: micro-batch handed back", microbatch_id=microbatch_id, error=str(exc))
            self._give_back(microbatch_id)
            return {"requests": 0, "recorded": 0}
        except BaseException:
            self._give_back(microbatch_id)
            raise
        finally:
            self.current_microbatch = None

    def queue_start(self, pipe: redis.client.Pipeline, microbatch_id: str, entries: bytes | None) -> StartCall | None:
        """Add this micro-batch's START to ``pipe`` (the RQ worker's start pipeline); None if taken back."""
        if entries is None:
            self._prepared = (microbatch_id, None)
            return None
        call = start_call(self.scripts, microbatch_id, entries.decode().split())
        self.scripts.queue(pipe, call.call)
        return call

    def finish_start(self, microbatch_id: str, call: StartCall | None, reply: Any) -> None:
        """Keep what the START in the RQ worker's pipeline returned, for :meth:`run_microbatch`."""
        if call is None:
            return
        self._prepared = (microbatch_id, apply_start(call, self.scripts.reply(call.call, reply)))

    def abandon_start(self, microbatch_id: str) -> None:
        """The start pipeline broke: its START may have run, so give the micro-batch back now."""
        self._prepared = None
        self._give_back(microbatch_id)

    def _start_and_run(self, microbatch_id: str) -> dict[str, int]:
        items = self._started_items(microbatch_id)
        if items is None:
            log.warning("micro-batch taken back before it started, skipped")
            return {"requests": 0, "recorded": 0}
        if self.runner is not None:
            admitted = self.runner.admit(microbatch_id, items)
            self._update_health()
            return {"requests": len(items), "admitted": admitted}
        return self.execute_and_record(microbatch_id, items)

    def _started_items(self, microbatch_id: str) -> list[Item] | None:
        """The items the RQ worker started with its bookkeeping, or (called directly) start them here."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == microbatch_id:
            return prepared[1]
        entries = self.conn.hget(keys.microbatch_key(microbatch_id), "entries")
        return None if entries is None else start_microbatch(self.scripts, microbatch_id, str(entries).split())

    def execute_and_record(self, microbatch_id: str, items: list[Item]) -> dict[str, int]:
        """Run started requests on the backend and record them (also if taken back meanwhile)."""
        self._set_busy(sum(1 for i in items if i.runnable))
        started_at = time.time()
        outcomes = self._execute(items)
        finished_at = time.time()
        results = self._results(items, outcomes, started_at, finished_at)
        work = sum(i.cost for i in items if i.runnable)
        self.meter.observe(work, finished_at - started_at)  # before recording: the load key then carries it
        recorded = self._with_redis_retry(lambda: self._record(microbatch_id, items, results, finished_at))
        if self.metrics is not None:
            self.metrics.observe_results(results.values(), [items[p].attempt for p in results])
        failed = sum(1 for r in results.values() if r.error and not r.cancelled)
        log.info(
            "micro-batch done", requests=len(items), recorded=recorded, failed=failed,
            tokens=work, elapsed_s=round(finished_at - started_at, 4), tokens_per_s=round(self.meter.tokens_per_s, 1),
        )  # fmt: skip
        return {"requests": len(items), "recorded": recorded}

    def _give_back(self, microbatch_id: str) -> None:
        """The run broke (time-out, Redis gone, bug): put the unfinished requests back, as if we had died."""
        try:
            requeue_microbatch(self.conn, self.scripts, self.worker_id, microbatch_id, mode=RequeueMode.RECOVER,
                               max_attempts=self.settings.max_attempts,
                               reason=f"worker {self.worker_id} failed this request's micro-batch")  # fmt: skip
        except redis.RedisError:
            log.warning("could not give back a micro-batch now; it is recovered after the outage",
                        microbatch_id=microbatch_id)  # fmt: skip
        finally:
            self._set_busy(0)

    def _execute(self, items: list[Item]) -> dict[int, Outcome]:
        runnable = [(p, i.payload) for p, i in enumerate(items) if i.runnable and i.payload is not None]
        requests = [
            BackendRequest(
                prompt=pl.prompt, max_tokens=pl.max_tokens, sampling=pl.sampling, messages=pl.messages, inputs=pl.input
            )
            for _, pl in runnable
        ]
        outcomes = self.executor.run(requests, self.meter.tokens_per_s)
        return {p: outcome for (p, _), outcome in zip(runnable, outcomes, strict=True)}

    def _results(
        self, items: list[Item], outcomes: dict[int, Outcome], started_at: float, finished_at: float
    ) -> dict[int, Result]:
        results: dict[int, Result] = {}
        for position, item in enumerate(items):
            if item.already_done:
                continue
            outcome = outcomes.get(position) or Outcome(failed(CANCELLED if item.cancelled else str(item.problem)), 0)
            out = outcome.output
            results[position] = Result(
                request_id=keys.request_id(item.batch_id, item.index), index=item.index,
                custom_id=item.payload.custom_id if item.payload else None, text=out.text,
                output_tokens=out.output_tokens, prompt_tokens=out.prompt_tokens,
                finish_reason=None if out.error else out.finish_reason, worker=self.worker_id,
                error=out.error, error_status=out.error_status, embeddings=out.embeddings, cancelled=item.cancelled,
                attempts=item.attempt + outcome.tries,
                submitted_at=item.submitted_at, started_at=started_at, finished_at=finished_at,
            )  # fmt: skip
        return results

    def _record(self, microbatch_id: str, items: list[Item], results: dict[int, Result], now: float) -> int:
        settled = [Settled(items[p], result) for p, result in results.items()]
        self._set_busy(0)
        return self._record_calls([(microbatch_id, settled, True)], now)[0]

    def _record_calls(self, calls: list[tuple[str, list[Settled], bool]], now: float) -> list[int]:
        """RECORD for each (micro-batch, results, final) and the load key, in one round trip."""
        pipe = self.conn.pipeline(transaction=False)
        wake_at = None  # a static worker wakes the balancer with each micro-batch it finishes
        if self.runner is not None:
            wake_at = self.slots + self.queue_slots - refill_batch(self.cfg.max_batch, self.queue_slots)
        records = [
            self.scripts.queue(pipe, record_call(self.scripts, mb, self.worker_id, self.model, now, settled,
                                                 final=final, wake_at=wake_at))
            for mb, settled, final in calls
        ]  # fmt: skip
        self.publish_load(pipe)
        if self.settings.redis.durable_acks:
            queue_durable_wait(pipe, self.settings)  # the results count as recorded once they are on disk
        replies = pipe.execute(raise_on_error=False)
        recorded = [self.scripts.reply(call, raw) for call, raw in zip(records, replies, strict=False)]
        for reply in replies[len(records) :]:
            if isinstance(reply, Exception):
                raise reply
        rerun = any(call.reran for call in records)
        if self.settings.redis.durable_acks and (rerun or not durable(replies[-1])):  # a rerun came after WAITAOF
            confirm_durable(self.conn, self.settings, "results")
        if garbage := sum(g for _, g in recorded):
            log.warning("recorded around garbage in redis (batch records or credit left alone)", keys=garbage)
            count_stat(self.conn, "garbage_keys", garbage)
        return [r for r, _ in recorded]

    # -- the runner's sink (its recorder thread calls these) ------------------------------------

    def record(self, batch: list[Recording]) -> None:
        """Write the results of requests that ended, grouped per micro-batch, in one round trip."""
        grouped: dict[str, tuple[Flight, list[Settled], bool]] = {}
        for r in batch:
            flight, settled, final = grouped.get(r.flight.microbatch_id, (r.flight, [], False))
            grouped[r.flight.microbatch_id] = (flight, settled + r.settled, final or r.final)
        calls = [(mb, settled, final) for mb, (_, settled, final) in grouped.items()]
        recorded = self._with_redis_retry(lambda: self._record_calls(calls, time.time()))
        for (flight, settled, final), count in zip(grouped.values(), recorded, strict=True):
            flight.recorded += count
            if self.metrics is not None:
                self.metrics.observe_results([s.result for s in settled], [s.item.attempt for s in settled])
            if final:
                self._log_done(flight)

    def give_back(self, flight: Flight) -> None:
        """The engine could not serve some requests of this micro-batch: they go back to the ingress."""
        moved = self._with_redis_retry(lambda: requeue_microbatch(
            self.conn, self.scripts, self.worker_id, flight.microbatch_id, mode=RequeueMode.RECOVER,
            max_attempts=self.settings.max_attempts, reason=f"worker {self.worker_id}: engine unavailable",
        ))  # fmt: skip
        log.warning("engine unavailable: requests handed back", microbatch_id=flight.microbatch_id,
                    requeued=moved[0].requests, dead_lettered=moved[0].dead_lettered)  # fmt: skip
        self._log_done(flight)

    def _log_done(self, flight: Flight) -> None:
        elapsed = time.time() - flight.started_at
        log.info("micro-batch done", microbatch_id=flight.microbatch_id, requests=len(flight.items),
                 recorded=flight.recorded, failed=flight.failed, tokens=flight.tokens, elapsed_s=round(elapsed, 4),
                 tokens_per_s=round(self.tokens_per_s, 1), in_engine=self.in_flight)  # fmt: skip

    def _with_redis_retry(self, step: Callable[[], T]) -> T:
        """Results are precious: ride out a Redis blip with bounded exponential backoff."""
        delay, deadline = 0.1, time.monotonic() + self.settings.producer.reconnect_grace_s
        while True:
            try:
                return step()
            except REDIS_FULL:  # results wait in memory until Redis has room again, unless we are asked to stop
                if self.draining and time.monotonic() + delay > deadline:
                    raise
                log.warning("redis is full (maxmemory, noeviction) while recording results; retrying",
                            retry_in_s=delay)  # fmt: skip
                count_stat(self.conn, "redis_full")
            except (*CONNECTION_ERRORS, NotDurable) as exc:  # not fsynced in time: recording again is harmless
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("redis unavailable while recording results; retrying", error=str(exc), retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, self.settings.redis.max_backoff_s)


def _gone_here(host: str, pid: str) -> bool:
    """True if ``host`` is ours and no process ``pid`` runs on it (a pid that is not a number proves nothing)."""
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
