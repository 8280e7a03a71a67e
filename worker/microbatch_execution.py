"""Running micro-batches: the start handshake, execution on the backend, results, recording, giving back, and
riding out Redis blips while recording.

The RQ glue (``worker/rq_worker.py``) starts a micro-batch in its own start pipeline and hands what it started
straight to :meth:`MicroBatchExecution.run`; a micro-batch nobody started yet (RQ's own workers, tests) goes
through :meth:`MicroBatchExecution.run_microbatch`, which starts it first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import redis
import structlog

from gpulb import keys
from gpulb.connection import CONNECTION_ERRORS, REDIS_FULL, confirm_durable, count_stat, durable, queue_durable_wait
from gpulb.errors import NotDurable
from gpulb.logs import get_logger
from gpulb.models import Result, refill_batch
from gpulb.recovery import RequeueMode, requeue_microbatch
from worker.backends.base import BackendRequest, EngineUnavailable, failed
from worker.context import WorkerContext
from worker.engine import Engine
from worker.execution import Outcome
from worker.health import Health
from worker.load import LoadReporter
from worker.metrics import WorkerMetrics
from worker.microbatch import Item, Settled, StartCall, apply_start, record_call, start_call, start_microbatch
from worker.runner import Flight, Recording, Sink

log = get_logger("gpulb.worker")
T = TypeVar("T")

CANCELLED = "cancelled"
NOTHING_RAN = {"requests": 0, "recorded": 0}


class Started(NamedTuple):
    """A micro-batch as its START left it: its items, or None if it was taken back before it started."""

    microbatch_id: str
    items: list[Item] | None


class MicroBatchExecution(Sink):
    """A static backend runs each micro-batch as one engine batch, the RQ job waiting for it. A continuous backend's
    runner only admits it (the RQ job returns then): its requests are recorded as each ends, through :meth:`record`.
    """

    def __init__(
        self, ctx: WorkerContext, engine: Engine, health: Health, load: LoadReporter,
        metrics: WorkerMetrics | None = None,
    ) -> None:  # fmt: skip
        self.ctx, self.engine, self.health, self.load, self.metrics = ctx, engine, health, load, metrics
        self.current_microbatch: str | None = None  # the one being started or run now (orphan sweeps leave it)

    # -- the start handshake --------------------------------------------------------------------

    def queue_start(self, pipe: redis.client.Pipeline, microbatch_id: str, entries: bytes | None) -> StartCall | None:
        """Add this micro-batch's START to ``pipe`` (the RQ worker's start pipeline); None if taken back."""
        if entries is None:
            return None
        call = start_call(self.ctx.scripts, microbatch_id, entries.decode().split())
        self.ctx.scripts.queue(pipe, call.call)
        return call

    def started(self, microbatch_id: str, call: StartCall | None, reply: Any) -> Started:
        """What the START queued by :meth:`queue_start` started, from its reply."""
        if call is None:
            return Started(microbatch_id, None)
        return Started(microbatch_id, apply_start(call, self.ctx.scripts.reply(call.call, reply)))

    def abandon_start(self, microbatch_id: str) -> None:
        """The start pipeline broke: its START may have run, so give the micro-batch back now."""
        self._give_back(microbatch_id)

    # -- running --------------------------------------------------------------------------------

    def run(self, started: Started) -> dict[str, int]:
        """Run a micro-batch the RQ worker started; returns counts for RQ's result."""
        return self._run(started.microbatch_id, lambda: started.items)

    def run_microbatch(self, microbatch_id: str) -> dict[str, int]:
        """Start one micro-batch here, then run it (RQ's job function and tests call this)."""
        return self._run(microbatch_id, lambda: self._start_here(microbatch_id))

    def _run(self, microbatch_id: str, items: Callable[[], list[Item] | None]) -> dict[str, int]:
        """Run one micro-batch and record each result once; give it back if the run breaks."""
        self.current_microbatch = microbatch_id
        try:
            with structlog.contextvars.bound_contextvars(microbatch_id=microbatch_id):
                return self._run_items(microbatch_id, items())
        except EngineUnavailable as exc:
            log.warning("engine unavailable: micro-batch handed back", microbatch_id=microbatch_id, error=str(exc))
            self._give_back(microbatch_id)
            return NOTHING_RAN.copy()
        except BaseException:
            self._give_back(microbatch_id)
            raise
        finally:
            self.current_microbatch = None

    def _start_here(self, microbatch_id: str) -> list[Item] | None:
        entries = self.ctx.conn.hget(keys.microbatch_key(microbatch_id), "entries")
        return None if entries is None else start_microbatch(self.ctx.scripts, microbatch_id, str(entries).split())

    def _run_items(self, microbatch_id: str, items: list[Item] | None) -> dict[str, int]:
        if items is None:
            log.warning("micro-batch taken back before it started, skipped")
            return NOTHING_RAN.copy()
        runner = self.engine.runner
        if runner is not None:
            admitted = runner.admit(microbatch_id, items)
            self.health.update()
            return {"requests": len(items), "admitted": admitted}
        return self.execute_and_record(microbatch_id, items)

    def execute_and_record(self, microbatch_id: str, items: list[Item]) -> dict[str, int]:
        """Run started requests on the backend and record them (also if taken back meanwhile)."""
        self._set_busy(sum(1 for i in items if i.runnable))
        started_at = time.time()
        outcomes = self._execute(items)
        finished_at = time.time()
        results = self._results(items, outcomes, started_at, finished_at)
        work = sum(i.cost for i in items if i.runnable)
        meter = self.engine.meter
        meter.observe(work, finished_at - started_at)  # before recording: the load key then carries it
        recorded = self._with_redis_retry(lambda: self._record(microbatch_id, items, results, finished_at))
        if self.metrics is not None:
            self.metrics.observe_results(results.values(), [items[p].attempt for p in results])
        failed = sum(1 for r in results.values() if r.error and not r.cancelled)
        log.info(
            "micro-batch done", requests=len(items), recorded=recorded, failed=failed,
            tokens=work, elapsed_s=round(finished_at - started_at, 4), tokens_per_s=round(meter.tokens_per_s, 1),
        )  # fmt: skip
        return {"requests": len(items), "recorded": recorded}

    def _set_busy(self, running: int) -> None:
        self.engine.running = running
        self.health.update()

    def _give_back(self, microbatch_id: str) -> None:
        """The run broke (time-out, Redis gone, bug): put the unfinished requests back, as if we had died."""
        ctx = self.ctx
        try:
            requeue_microbatch(ctx.conn, ctx.scripts, ctx.worker_id, microbatch_id, mode=RequeueMode.RECOVER,
                               max_attempts=ctx.settings.max_attempts,
                               reason=f"worker {ctx.worker_id} failed this request's micro-batch")  # fmt: skip
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
        outcomes = self.engine.executor.run(requests, self.engine.meter.tokens_per_s)
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
                finish_reason=None if out.error else out.finish_reason, worker=self.ctx.worker_id,
                error=out.error, error_status=out.error_status, embeddings=out.embeddings, cancelled=item.cancelled,
                attempts=item.attempt + outcome.tries,
                submitted_at=item.submitted_at, started_at=started_at, finished_at=finished_at,
            )  # fmt: skip
        return results

    # -- recording ------------------------------------------------------------------------------

    def _record(self, microbatch_id: str, items: list[Item], results: dict[int, Result], now: float) -> int:
        settled = [Settled(items[p], result) for p, result in results.items()]
        self._set_busy(0)
        return self._record_calls([(microbatch_id, settled, True)], now)[0]

    def _record_calls(self, calls: list[tuple[str, list[Settled], bool]], now: float) -> list[int]:
        """RECORD for each (micro-batch, results, final) and the load key, in one round trip."""
        ctx, engine = self.ctx, self.engine
        pipe = ctx.conn.pipeline(transaction=False)
        wake_at = None  # a static worker wakes the balancer with each micro-batch it finishes
        if engine.runner is not None:
            wake_at = engine.slots + engine.queue_slots - refill_batch(ctx.cfg.max_batch, engine.queue_slots)
        records = [
            ctx.scripts.queue(pipe, record_call(ctx.scripts, mb, ctx.worker_id, ctx.model, now, settled,
                                                final=final, wake_at=wake_at))
            for mb, settled, final in calls
        ]  # fmt: skip
        self.load.publish(pipe)
        durable_acks = ctx.settings.redis.durable_acks
        if durable_acks:
            queue_durable_wait(pipe, ctx.settings)  # the results count as recorded once they are on disk
        replies = pipe.execute(raise_on_error=False)
        recorded = [ctx.scripts.reply(call, raw) for call, raw in zip(records, replies, strict=False)]
        for reply in replies[len(records) :]:
            if isinstance(reply, Exception):
                raise reply
        rerun = any(call.reran for call in records)
        if durable_acks and (rerun or not durable(replies[-1])):  # a rerun came after WAITAOF
            confirm_durable(ctx.conn, ctx.settings, "results")
        if garbage := sum(g for _, g in recorded):
            log.warning("recorded around garbage in redis (batch records or credit left alone)", keys=garbage)
            count_stat(ctx.conn, "garbage_keys", garbage)
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
        ctx = self.ctx
        moved = self._with_redis_retry(lambda: requeue_microbatch(
            ctx.conn, ctx.scripts, ctx.worker_id, flight.microbatch_id, mode=RequeueMode.RECOVER,
            max_attempts=ctx.settings.max_attempts, reason=f"worker {ctx.worker_id}: engine unavailable",
        ))  # fmt: skip
        log.warning("engine unavailable: requests handed back", microbatch_id=flight.microbatch_id,
                    requeued=moved[0].requests, dead_lettered=moved[0].dead_lettered)  # fmt: skip
        self._log_done(flight)

    def _log_done(self, flight: Flight) -> None:
        elapsed = time.time() - flight.started_at
        log.info("micro-batch done", microbatch_id=flight.microbatch_id, requests=len(flight.items),
                 recorded=flight.recorded, failed=flight.failed, tokens=flight.tokens, elapsed_s=round(elapsed, 4),
                 tokens_per_s=round(self.engine.tokens_per_s, 1), in_engine=self.engine.in_flight)  # fmt: skip

    def _with_redis_retry(self, step: Callable[[], T]) -> T:
        """Results are precious: ride out a Redis blip with bounded exponential backoff."""
        settings = self.ctx.settings
        delay, deadline = 0.1, time.monotonic() + settings.producer.reconnect_grace_s
        while True:
            try:
                return step()
            except REDIS_FULL:  # results wait in memory until Redis has room again, unless we are asked to stop
                if self.health.draining and time.monotonic() + delay > deadline:
                    raise
                log.warning("redis is full (maxmemory, noeviction) while recording results; retrying",
                            retry_in_s=delay)  # fmt: skip
                count_stat(self.ctx.conn, "redis_full")
            except (*CONNECTION_ERRORS, NotDurable) as exc:  # not fsynced in time: recording again is harmless
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("redis unavailable while recording results; retrying", error=str(exc), retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, settings.redis.max_backoff_s)
