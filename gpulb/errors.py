"""The one exception tree of gpulb.

Every error gpulb raises on purpose derives from :class:`GpulbError`. Errors about what the
caller passed in also derive from :class:`ValueError`, and time-outs from the built-in
:class:`TimeoutError`, so ``except ValueError`` and ``except TimeoutError`` keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class GpulbError(Exception):
    """Base class of every error gpulb raises on purpose."""


class InvalidRequest(GpulbError, ValueError):
    """A request or batch was refused before anything was written to Redis."""


class ConfigError(GpulbError, ValueError):
    """A setting or command-line option is invalid."""


class BrokerUnavailable(GpulbError):
    """Redis could not be reached (or answered with a connection error) within the time allowed."""


class BrokerFull(BrokerUnavailable):
    """Redis refused a write: it reached ``maxmemory`` and evicts nothing (``noeviction``). Nothing was written."""


class NotDurable(BrokerUnavailable):
    """``durable_acks`` is on and Redis did not confirm, within the time allowed, that a write is fsynced to its AOF.
    The write itself was made: it is in Redis's memory, but may not survive a power loss."""


class BatchNotFound(GpulbError, KeyError):
    """No batch with this id exists (never submitted, or expired)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "batch not found"


class ResultTimeout(GpulbError, TimeoutError):
    """Waiting for a result or a batch took longer than the caller allowed."""


class StreamBroken(GpulbError):
    """A streamed request was run again after part of its answer had been read: the rest cannot be joined to it."""


class WorkerIdInUse(GpulbError):
    """Another live worker already serves under this id."""

    exit_code = 4  # of `gpulb worker`: starting it again cannot help, so supervisors do not


class RqIncompatible(GpulbError):
    """The installed RQ lacks a method, argument or key name gpulb relies on (checked when a worker or a balancer
    starts): install the RQ version gpulb pins."""


class BackendError(GpulbError):
    """The inference backend failed to start or to run a batch."""


class BadPayload(GpulbError, ValueError):
    """Data read back from Redis does not have the shape gpulb wrote (foreign or corrupted)."""


class GarbageInRedis(BadPayload):
    """A gpulb script found a key that gpulb did not write as it is (wrong type, a counter that is not an integer)
    and refused before writing anything."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__(f"Redis holds data at {key} that gpulb did not write: it {what}; nothing was written")
        self.key, self.what = key, what


def field_error(error: Mapping[str, Any], skip: Sequence[str] = ()) -> tuple[str, str]:
    """``(field, message)`` of one pydantic error (``ValidationError.errors()[i]``), for a person to read: the field
    as a dotted path (``''`` for the whole object; ``skip`` drops parts such as FastAPI's ``body``), and the
    message without pydantic's ``Value error,`` / ``Assertion failed,`` prefix."""
    field = ".".join(str(part) for part in error.get("loc", ()) if part not in skip)
    message = str(error.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return field, message
