"""What every part of one worker shares: who it is, what it serves, where Redis is, and its stop flag."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import redis

from gpulb.scripts import Scripts
from gpulb.settings import Settings, WorkerSettings


@dataclass(frozen=True)
class WorkerContext:
    worker_id: str
    model: str
    conn: redis.Redis  # decoded replies: gpulb's own keys
    rq_conn: redis.Redis  # raw replies, as RQ reads its job hashes
    settings: Settings
    scripts: Scripts
    stopping: threading.Event = field(default_factory=threading.Event)  # the process stops: waits end early

    @classmethod
    def of(cls, conn: redis.Redis, rq_conn: redis.Redis, settings: Settings) -> WorkerContext:
        cfg = settings.worker
        if not cfg.model:
            raise ValueError("worker settings need a model")
        return cls(cfg.resolved_id(), cfg.model, conn, rq_conn, settings, Scripts(conn))

    @property
    def cfg(self) -> WorkerSettings:
        return self.settings.worker
