"""A read-only view of the fleet for ``gpulb status``: workers with their load, ingress depths."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import redis

from gpulb import keys
from gpulb.errors import BadPayload
from gpulb.models import BatchStatus
from gpulb.records import load_from_reply, queue_load_reads, read_batch_statuses


@dataclass(frozen=True, slots=True)
class WorkerRow:
    worker_id: str
    model: str
    state: str
    running: int
    queued: int
    outstanding_batches: int
    tokens_per_s: float
    capacity: int
    heartbeat_age_s: float | None
    backend: str = ""
    engine_waiting: int | None = None  # None: the engine cannot tell
    kv_cache_percent: float | None = None
    gpu_util_percent: float | None = None
    gpu_mem_used_mb: float | None = None
    slots: int = 0  # a continuous engine's slots (running is then "of slots"); 0 for a static engine

    @property
    def slots_text(self) -> str:
        return f"{self.running}/{self.slots}" if self.slots else str(self.running)


def _known(value: float) -> float | None:
    return None if value < 0 else value


@dataclass(frozen=True, slots=True)
class ModelRow:
    model: str
    pending_requests: int
    pending_tokens: int


@dataclass(frozen=True, slots=True)
class BatchRow:
    batch_id: str
    model: str
    state: str
    total: int
    done: int
    failed: int
    running: int
    age_s: float


@dataclass(frozen=True, slots=True)
class BalancerRow:
    host: str
    pid: int
    heartbeat_age_s: float
    requests: int
    micro_batches: int
    policy: str = ""


@dataclass(slots=True)
class FleetStatus:
    balancer: BalancerRow | None = None
    workers: list[WorkerRow] = field(default_factory=list)
    models: list[ModelRow] = field(default_factory=list)
    batches: list[BatchRow] = field(default_factory=list)  # not finished yet, newest first
    bad_data: dict[str, int] = field(default_factory=dict)  # malformed things seen in Redis and skipped

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def read_fleet_status(conn: redis.Redis) -> FleetStatus:
    worker_ids: list[str] = sorted(conn.smembers(keys.workers_key()))  # type: ignore[arg-type]
    models: list[str] = sorted(conn.smembers(keys.models_key()))  # type: ignore[arg-type]
    pipe = conn.pipeline(transaction=False)
    pipe.hgetall(keys.balancer_heartbeat_key())
    pipe.hgetall(keys.stats_key())
    queue_load_reads(pipe, worker_ids)
    for worker_id in worker_ids:
        pipe.hget(keys.credit_key(worker_id), "batches")
    for model in models:
        pipe.get(keys.ingress_requests_key(model))
        pipe.get(keys.ingress_tokens_key(model))
    replies = iter(pipe.execute())
    now = time.time()
    status = FleetStatus(balancer=_balancer_row(next(replies), now))
    status.bad_data = {name: int(count) for name, count in next(replies).items()}
    load_replies = [next(replies) for _ in worker_ids]
    for worker_id, load_reply in zip(worker_ids, load_replies, strict=True):
        status.workers.append(_row(worker_id, load_reply, int(next(replies) or 0), now))
    for model in models:
        depth, tokens = next(replies), next(replies)
        status.models.append(
            ModelRow(model=model, pending_requests=max(0, int(depth or 0)), pending_tokens=int(tokens or 0))
        )
    status.batches = _batches_in_flight(conn, now)
    return status


BATCHES_SCANNED = 200


def _batches_in_flight(conn: redis.Redis, now: float) -> list[BatchRow]:
    """Unfinished batches among the newest ``BATCHES_SCANNED`` (malformed records left out)."""
    batch_ids: list[str] = conn.zrevrange(keys.batches_key(), 0, BATCHES_SCANNED - 1)  # type: ignore[assignment]
    statuses, _ = read_batch_statuses(conn, batch_ids)
    return [_batch_row(status, now) for status in statuses if not status.finished]


def _batch_row(status: BatchStatus, now: float) -> BatchRow:
    age_s = round(max(0.0, now - status.submitted_at), 1)
    return BatchRow(status.batch_id, status.model, status.state.value, status.total, status.done, status.failed,
                    status.running, age_s)  # fmt: skip


def _balancer_row(raw: dict[str, str], now: float) -> BalancerRow | None:
    try:
        return BalancerRow(raw["host"], int(raw["pid"]), round(max(0.0, now - float(raw["ts"])), 1),
                           int(raw["requests"]), int(raw["micro_batches"]), raw.get("policy", ""))  # fmt: skip
    except (KeyError, ValueError):
        return None


def _row(worker_id: str, load_reply: dict[str, str], batches: int, now: float) -> WorkerRow:
    try:
        load = load_from_reply(load_reply)
    except BadPayload:
        return WorkerRow(worker_id, "?", "malformed", 0, 0, batches, 0.0, 0, None)
    if load is None:
        return WorkerRow(worker_id, "?", "gone", 0, 0, batches, 0.0, 0, None)
    return WorkerRow(
        worker_id=worker_id,
        model=load.model,
        state=load.state.value,
        running=load.running,
        queued=load.queued,
        outstanding_batches=batches,
        tokens_per_s=load.tokens_per_s,
        capacity=load.capacity,
        heartbeat_age_s=round(max(0.0, now - load.ts), 1),
        backend=load.backend,
        engine_waiting=None if load.engine_waiting < 0 else load.engine_waiting,
        kv_cache_percent=None if load.kv_cache_usage < 0 else round(100 * load.kv_cache_usage, 1),
        gpu_util_percent=_known(load.gpu_util),
        gpu_mem_used_mb=_known(load.gpu_mem_used_mb),
        slots=load.slots,
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def render_table(status: FleetStatus) -> str:
    b = status.balancer
    lines = [
        "balancer: not running (no heartbeat)"
        if b is None
        else f"balancer: {b.host} pid {b.pid} ({b.policy}), beat {b.heartbeat_age_s:.1f}s ago, "
        f"{b.requests} requests in {b.micro_batches} micro-batches dispatched",
        "",
        f"{'WORKER':<24} {'MODEL':<20} {'BACKEND':<16} {'STATE':<9} {'RUN/SLOTS':>9} {'QUEUED':>6} {'TOK/S':>9} "
        f"{'CAP':>5} {'KV':>5} {'GPU':>5} {'BEAT':>6}",
    ]
    for w in status.workers:
        age = "-" if w.heartbeat_age_s is None else f"{w.heartbeat_age_s:.1f}s"
        lines.append(
            f"{w.worker_id:<24} {w.model:<20} {w.backend:<16} {w.state:<9} {w.slots_text:>9} {w.queued:>6} "
            f"{w.tokens_per_s:>9.0f} {w.capacity:>5} {_percent(w.kv_cache_percent):>5} "
            f"{_percent(w.gpu_util_percent):>5} {age:>6}"
        )
    if not status.workers:
        lines.append("(no workers registered)")
    lines.append("")
    lines.append(f"{'MODEL':<32} {'PENDING':>9} {'TOKENS':>12}")
    for m in status.models:
        lines.append(f"{m.model:<32} {m.pending_requests:>9} {m.pending_tokens:>12}")
    if not status.models:
        lines.append("(no models seen yet)")
    lines += ["", f"{'BATCH':<18} {'MODEL':<20} {'STATE':<8} {'DONE':>15} {'FAILED':>7} {'RUNNING':>8} {'AGE':>8}"]
    for row in status.batches:
        progress = f"{row.done:,}/{row.total:,}"
        lines.append(f"{row.batch_id:<18} {row.model:<20} {row.state:<8} {progress:>15} {row.failed:>7,} "
                     f"{row.running:>8,} {row.age_s:>7.0f}s")  # fmt: skip
    if not status.batches:
        lines.append("(no batches in flight)")
    if status.bad_data:
        lines += ["", "bad data skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(status.bad_data.items()))]
    return "\n".join(lines)
