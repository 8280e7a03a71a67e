"""Redis connections: bounded time-outs and retries, and Redis errors translated at the edge.

gpulb's own client decodes responses to ``str``; RQ needs a client that returns ``bytes``.
Both come from the same URL and settings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from gpulb import keys
from gpulb.errors import BrokerFull, BrokerUnavailable, ConfigError, NotDurable
from gpulb.settings import Settings

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# Redis at maxmemory with noeviction refuses writes, and every command inside a MULTI, reads included. Memory
# comes back (results expire, a reader drains them, an operator raises maxmemory): a process backs off and
# carries on, as after a connection blip. Never retried by redis-py itself: the same write would fail again.
REDIS_FULL = redis.exceptions.OutOfMemoryError
BLIP_ERRORS = (*CONNECTION_ERRORS, REDIS_FULL)


def connect(settings: Settings, *, decode: bool = True, retries: int = 2) -> redis.Redis:
    """A client for ``settings.redis_url``; it does not talk to Redis until first used.

    Calls are retried ``retries`` times on a connection error: use ``retries=0`` for a call that
    must not run twice (a transaction whose reply may be lost after it ran).
    """
    cfg = settings.redis
    check_tls(settings)
    password = cfg.password.get_secret_value() if cfg.password else None
    kwargs: dict[str, object] = {
        "decode_responses": decode,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "socket_timeout": cfg.socket_timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=retries),
        "retry_on_error": list(CONNECTION_ERRORS),
        "health_check_interval": 30,
    }
    if password is not None:
        kwargs["password"] = password
    if cfg.ssl_ca_certs:
        kwargs["ssl_ca_certs"] = cfg.ssl_ca_certs
    try:
        return redis.Redis.from_url(settings.redis_url, **kwargs)
    except ValueError as exc:
        raise BrokerUnavailable(f"invalid redis URL {redact_url(settings.redis_url)}: {exc}") from exc


def check_tls(settings: Settings) -> None:
    """A CA file is for TLS: with a plain ``redis://`` URL redis-py would fail every command with a TypeError."""
    scheme = urlsplit(settings.redis_url).scheme
    if settings.redis.ssl_ca_certs and scheme != "rediss":
        raise ConfigError(
            f"ssl_ca_certs (GPULB_REDIS__SSL_CA_CERTS) is set but the URL is {scheme}:// "
            f"({redact_url(settings.redis_url)}): use rediss:// for TLS, or unset ssl_ca_certs"
        )


@contextmanager
def broker_errors(url: str) -> Iterator[None]:
    """Translate redis-py connection failures into :class:`BrokerUnavailable`, a full Redis into :class:`BrokerFull`."""
    try:
        yield
    except REDIS_FULL as exc:
        raise full(url) from exc
    except CONNECTION_ERRORS as exc:
        raise unavailable(url, exc) from exc


def unavailable(url: str, exc: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(f"Redis at {redact_url(url)} is unreachable: {exc}")


def full(url: str) -> BrokerFull:
    return BrokerFull(
        f"Redis at {redact_url(url)} is full (used memory > maxmemory, policy noeviction): nothing was written. "
        "Free memory (read or delete finished batches, or let their results expire) or raise maxmemory, then retry"
    )


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe to log or print)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def count_stat(conn: redis.Redis, field: str, amount: int = 1) -> None:
    """Add to a counter of ``gpulb:stats`` (bad data seen, Redis full...), shown by ``gpulb status``. Best effort:
    a Redis that is full or away loses the count, never the process."""
    with contextlib.suppress(redis.RedisError):
        conn.hincrby(keys.stats_key(), field, amount)


# -- durable acknowledgements (settings.redis.durable_acks) -------------------------------------------------------
# WAITAOF blocks the client until its own previous writes are fsynced to the AOF. The AOF is one sequence, so the
# fsync of a later write confirms every earlier one, whoever made it: a reader confirms what it read by one write.


def queue_durable_wait(pipe: redis.client.Pipeline, settings: Settings) -> None:
    """Queue ``WAITAOF 1 0 T`` after the writes of ``pipe``, on their connection: it waits for its own client's."""
    pipe.execute_command("WAITAOF", 1, 0, int(settings.redis.durable_timeout_s * 1000))  # type: ignore[no-untyped-call]


def durable(reply: Any) -> bool:
    """Whether a WAITAOF reply says the local AOF has the writes on disk."""
    return isinstance(reply, list | tuple) and len(reply) == 2 and int(reply[0]) >= 1


def confirm_durable(conn: redis.Redis, settings: Settings, what: str) -> None:
    """Wait until every write Redis acknowledged so far is fsynced; :class:`NotDurable` after ``durable_timeout_s``."""
    deadline = time.monotonic() + settings.redis.durable_timeout_s
    while True:
        pipe = conn.pipeline(transaction=False)
        pipe.incr(keys.durable_mark_key())
        queue_durable_wait(pipe, settings)
        if durable(pipe.execute()[1]):
            return
        if time.monotonic() >= deadline:
            raise NotDurable(
                f"Redis at {redact_url(settings.redis_url)} did not fsync {what} to its AOF within "
                f"{settings.redis.durable_timeout_s:g} s: it is in Redis's memory but may not survive a power loss"
            )


def check_durable_acks(conn: redis.Redis, settings: Settings) -> None:
    """With ``durable_acks`` the server must offer WAITAOF (Redis >= 7.2, Valkey) and keep an AOF, else ConfigError."""
    if not settings.redis.durable_acks:
        return
    try:
        conn.execute_command("WAITAOF", 1, 0, 1)  # type: ignore[no-untyped-call]  # 1 ms; refused where no AOF
    except redis.ResponseError as exc:
        text = str(exc)
        reason = "it has no AOF (appendonly no)" if "appendonly" in text else "it has no WAITAOF (Redis >= 7.2 has)"
        raise ConfigError(
            f"durable_acks (GPULB_REDIS__DURABLE_ACKS) needs a Redis that can confirm an fsync, but "
            f"{redact_url(settings.redis_url)} cannot: {reason}. Turn durable_acks off, or run Redis >= 7.2 with "
            f"appendonly yes (or any Redis with appendfsync always, which makes every write durable)"
        ) from exc
