"""Which models the fleet serves now, as the gateway asks before it takes work for one."""

from __future__ import annotations

import time

import redis

from gpulb.records import read_served_models

FRESH_S = 1.0  # online requests ask each time: read Redis at most this often, unless the model is not among them


class ServedModels:
    """The models live workers serve, with a short cache for the online path."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self._cached: tuple[float, frozenset[str]] = (-FRESH_S, frozenset())

    def all(self) -> list[str]:
        models = read_served_models(self.conn)
        self._cached = (time.monotonic(), frozenset(models))
        return models

    def serves(self, model: str) -> bool:
        read_at, served = self._cached
        if time.monotonic() - read_at > FRESH_S or model not in served:
            served = frozenset(self.all())
        return model in served
