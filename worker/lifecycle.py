"""A worker's life in Redis: claim its id and register, beat (its load key, a sick or dead engine, micro-batches
held that nothing here runs), take back orphans after an outage, drain and deregister."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import redis
import structlog

from gpulb import keys
from gpulb.connection import check_durable_acks
from gpulb.errors import WorkerIdInUse
from gpulb.logs import get_logger
from gpulb.models import WorkerState
from gpulb.recovery import Requeued, RequeueMode, recover_worker, requeue_microbatch
from gpulb.rq_books import retire_worker
from worker.context import WorkerContext
from worker.engine import Engine
from worker.health import Health
from worker.load import LoadReporter
from worker.microbatch_execution import MicroBatchExecution

log = get_logger("gpulb.worker")

ORPHAN_SWEEP_BEATS = 30  # heartbeats between two sweeps for orphaned micro-batches
ID_CLAIM_S = 30  # the longest a registering worker holds its id's claim key; once registered, its load key does


class Lifecycle:
    def __init__(
        self, ctx: WorkerContext, engine: Engine, health: Health, load: LoadReporter, execution: MicroBatchExecution
    ) -> None:
        self.ctx, self.engine, self.health, self.load, self.execution = ctx, engine, health, load, execution
        self._beats = 0
        self._orphan_suspects: frozenset[str] = frozenset()  # micro-batches that looked orphaned at the last sweep
        self._redis_run_id: str | None = None  # changes when Redis restarts
        self._prompt_sweeps = 0  # sweeps due at the next beats, whatever ORPHAN_SWEEP_BEATS says

    # -- registering ----------------------------------------------------------------------------

    def register(self) -> Requeued:
        """Claim the worker id, take back what a dead predecessor of this id held, announce idle."""
        ctx = self.ctx
        check_durable_acks(ctx.conn, ctx.settings)
        self._wait_for_predecessor()
        retire_worker(ctx.rq_conn, ctx.worker_id)
        recovered = recover_worker(ctx.conn, ctx.rq_conn, ctx.scripts, ctx.worker_id,
                                   max_attempts=ctx.settings.max_attempts)  # fmt: skip
        structlog.contextvars.bind_contextvars(worker_id=ctx.worker_id)
        self.engine.start_runner(self.execution)
        self.load.refresh_engine_status()
        self.health.state = WorkerState.IDLE
        self.health.update()
        self._announce()
        structlog.contextvars.bind_contextvars(worker_id=ctx.worker_id)
        log.info("worker registered", model=ctx.model, backend=self.engine.backend.name, capacity=ctx.cfg.max_batch,
                 slots=self.engine.slots, queue_slots=self.engine.queue_slots,
                 recovered_requests=recovered.requests)  # fmt: skip
        return recovered

    def _announce(self) -> None:
        """Load key, model, RQ queue and a wake-up for the balancer, in one round trip (the scripts loaded too)."""
        ctx = self.ctx
        pipe = ctx.conn.pipeline(transaction=False)
        ctx.scripts.queue_loads(pipe)
        self.load.publish(pipe)
        pipe.sadd(keys.models_key(), ctx.model)
        pipe.sadd(keys.rq_queues_key(), keys.rq_queue_key(ctx.worker_id))  # `rq info` lists the queue at once
        pipe.rpush(keys.wakeup_key(), keys.wake_worker_token(ctx.worker_id))
        pipe.ltrim(keys.wakeup_key(), -keys.WAKEUP_KEEP, -1)
        pipe.delete(keys.worker_claim_key(ctx.worker_id))  # the load key guards the id from now on
        pipe.info("server")
        replies = pipe.execute(raise_on_error=False)
        if error := next((r for r in replies[:-1] if isinstance(r, Exception)), None):
            raise error
        self._notice_restart(replies[-1])

    def _wait_for_predecessor(self) -> None:
        """Claim the id, then look at its load key: a live worker's refuses, a dead one's is waited out (at once if
        its pid is gone on this host). Of workers racing for one id, exactly one gets past; the others refuse."""
        deadline: float | None = None  # a load key still refreshed a TTL after we first saw it is a live worker's
        while (blocker := self._claim_id()) is not None:
            if blocker == "load key":
                deadline = deadline or time.monotonic() + self.ctx.cfg.load_ttl_s + 1
                if time.monotonic() > deadline:
                    raise WorkerIdInUse(
                        f"worker id {self.ctx.worker_id!r} is in use by a live worker (its load key keeps being "
                        "refreshed); pick another --id or stop that worker"
                    )
            self.ctx.stopping.wait(0.25)

    def _claim_id(self) -> str | None:
        """None once the id is ours (SET NX of its claim key, then no live load key); else what holds it."""
        conn = self.ctx.conn
        claim, load = keys.worker_claim_key(self.ctx.worker_id), keys.load_key(self.ctx.worker_id)
        if not conn.set(claim, f"{socket.gethostname()}:{os.getpid()}", nx=True, ex=ID_CLAIM_S):
            self._drop_dead_claim(claim)
            return "claim"  # another worker is registering under this id
        raw: dict[str, str] = conn.hgetall(load)  # type: ignore[assignment]
        if not raw:
            return None
        if _gone_here(raw.get("host", ""), raw.get("pid", "")):
            conn.delete(load)  # our host, its process is gone
            return None
        conn.delete(claim)
        return "load key"

    def _drop_dead_claim(self, claim: str) -> None:
        """Delete a claim whose holder was a process of this host that is gone (checked and deleted atomically)."""
        with self.ctx.conn.pipeline() as pipe, contextlib.suppress(redis.WatchError):
            pipe.watch(claim)  # type: ignore[no-untyped-call]
            host, _, pid = str(pipe.get(claim) or "").rpartition(":")
            if _gone_here(host, pid):
                pipe.multi()
                pipe.delete(claim)
                pipe.execute()

    # -- the heartbeat --------------------------------------------------------------------------

    def beat(self) -> None:
        """Refresh the load key; called from the heartbeat thread, also while a batch runs.

        Every ``ORPHAN_SWEEP_BEATS`` beats it also takes back micro-batches this worker holds but
        will never run (neither queued nor running: a start or a give-back that Redis refused).
        """
        pipe = self.ctx.conn.pipeline(transaction=False)
        pipe.llen(keys.rq_queue_key(self.ctx.worker_id))
        pipe.info("server")
        queued, server = pipe.execute(raise_on_error=False)
        if isinstance(queued, Exception):
            raise queued
        self.load.queued = int(queued)
        self._notice_restart(server)
        if self.health.state is WorkerState.STARTING:
            return
        self._watch_engine()
        self.load.publish()
        if self.health.state is WorkerState.UNHEALTHY and self.load.queued:  # every beat: the state may have changed
            released = self.release_queued()
            log.warning("engine unhealthy: queued work handed back", released_requests=released)
        self._beats += 1
        due = self._prompt_sweeps > 0 or self._beats % ORPHAN_SWEEP_BEATS == 0
        if due and self.health.state is not WorkerState.DRAINING:
            self._prompt_sweeps = max(0, self._prompt_sweeps - 1)
            swept = self.sweep_orphans()
            if swept.microbatches:
                log.warning("took back orphaned micro-batches", requeued=swept.requests)

    def _watch_engine(self) -> None:
        """How the engine is: an unhealthy one takes no new work; one dead for good stops the worker (exit code 3)."""
        self.load.refresh_engine_status()
        if self.health.update():
            log.warning("engine unhealthy: taking no new work")
        if self.engine.backend.dead() and not self.health.engine_died:
            self.health.engine_died = True  # queued work goes back at this beat; the process stops, to start afresh
            log.error("engine died for good: handing work back and stopping the worker (exit code 3)")
            os.kill(os.getpid(), signal.SIGTERM)

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

    # -- taking work back -----------------------------------------------------------------------

    def release_queued(self) -> int:
        """Hand every queued (not started) micro-batch back to the front of the ingress."""
        ctx = self.ctx
        released = 0
        queued: list[str] = ctx.conn.lrange(keys.rq_queue_key(ctx.worker_id), 0, -1)  # type: ignore[assignment]
        for microbatch_id in queued:
            moved, _ = requeue_microbatch(
                ctx.conn, ctx.scripts, ctx.worker_id, microbatch_id, mode=RequeueMode.RELEASE,
                max_attempts=ctx.settings.max_attempts, reason="released",
            )  # fmt: skip
            released += moved.requests
        return released

    def sweep_orphans(self) -> Requeued:
        """Take back the micro-batches that looked orphaned at this sweep and the one before.

        One seen once may be between the RQ worker's BLMOVE and its start (neither queued nor current
        yet); a real orphan stays one.
        """
        ctx = self.ctx
        current = self.execution.current_microbatch
        inflight: set[str] = ctx.conn.smembers(keys.inflight_key(ctx.worker_id))  # type: ignore[assignment]
        queued: list[str] = ctx.conn.lrange(keys.rq_queue_key(ctx.worker_id), 0, -1)  # type: ignore[assignment]
        suspects = frozenset(inflight - set(queued) - {current} - self.engine.admitted())
        confirmed, self._orphan_suspects = suspects & self._orphan_suspects, suspects
        if not confirmed:
            return Requeued()
        running = self.execution.current_microbatch  # it may have started since
        keep = self.engine.admitted() | ({running} if running else set())
        return recover_worker(ctx.conn, ctx.rq_conn, ctx.scripts, ctx.worker_id,
                              max_attempts=ctx.settings.max_attempts, only=confirmed,
                              keep=frozenset(keep))  # fmt: skip

    def recover_orphans(self, keep: frozenset[str] = frozenset()) -> Requeued:
        """After an outage: take back micro-batches we hold but will never run (not queued, not running)."""
        ctx = self.ctx
        queued: list[str] = ctx.conn.lrange(keys.rq_queue_key(ctx.worker_id), 0, -1)  # type: ignore[assignment]
        return recover_worker(ctx.conn, ctx.rq_conn, ctx.scripts, ctx.worker_id,
                              max_attempts=ctx.settings.max_attempts,
                              keep=frozenset(queued) | keep | self.engine.admitted())  # fmt: skip

    def deregister(self) -> None:
        """Stop being a target: mark draining, hand back queued work, remove the load key."""
        ctx = self.ctx
        self.health.start_draining()
        self.load.publish()
        released = self.release_queued()
        orphans = recover_worker(
            ctx.conn, ctx.rq_conn, ctx.scripts, ctx.worker_id, max_attempts=ctx.settings.max_attempts
        )  # the drain waited for what ran: what is left is orphaned (or dies with this process)
        released += orphans.requests
        pipe = ctx.conn.pipeline(transaction=False)
        pipe.delete(keys.load_key(ctx.worker_id))
        pipe.srem(keys.workers_key(), ctx.worker_id)
        pipe.srem(keys.rq_queues_key(), keys.rq_queue_key(ctx.worker_id))
        pipe.execute()
        log.info("worker deregistered", released_requests=released)


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
