"""The Python API: ``Client.submit`` / ``submit_batch`` and the handles that wait for results."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import redis

from gpulb import keys
from gpulb.connection import (
    CONNECTION_ERRORS,
    broker_errors,
    check_durable_acks,
    confirm_durable,
    connect,
    unavailable,
)
from gpulb.errors import ResultTimeout
from gpulb.models import BatchStatus, RequestSpec, Result
from gpulb.records import read_batch_status, read_result, read_results
from gpulb.scripts import Scripts
from gpulb.settings import Settings
from producer import store
from producer.streaming import abort, follow_text
from producer.validation import (
    CheckedRequest,
    validate_batch_id,
    validate_metadata,
    validate_model,
    validate_priority,
    validate_requests,
    validate_result_ttl,
)

T = TypeVar("T")


class Client:
    """Submits requests to a gpulb fleet and reads their results back.

    ``Client()`` reads ``GPULB_REDIS_URL`` (default ``redis://localhost:6379/0``)::

        client = Client()
        batch = client.submit_batch(["Hello", {"prompt": "Hi", "max_tokens": 8}], model="llama-3-8b")
        for result in batch.results(timeout=600):
            print(result.worker, result.text)
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        connection: redis.Redis | None = None,
    ) -> None:
        settings = settings or Settings()
        if redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.settings = settings
        self._conn = connection if connection is not None else connect(settings)
        self._publish_conn = connection if connection is not None else connect(settings, retries=0)
        self._scripts = Scripts(self._conn)
        self._durability_checked = False

    def submit(self, prompt: str, *, model: str, max_tokens: int = 16, priority: int = 0, **sampling: Any) -> JobHandle:
        """Submit one request; ``sampling`` takes vLLM-style fields (temperature, top_p, seed, stop...)."""
        batch = self.submit_batch(
            [{"prompt": prompt, "max_tokens": max_tokens, **sampling}], model=model, priority=priority
        )
        return JobHandle(batch, 0)

    def submit_batch(
        self,
        requests: Iterable[str | Mapping[str, Any] | RequestSpec | CheckedRequest],
        *,
        model: str,
        max_tokens: int = 16,
        priority: int = 0,
        metadata: Mapping[str, str] | None = None,
        result_ttl_s: int | None = None,
        listed: bool = True,
    ) -> BatchHandle:
        """Validate every request, then enqueue them all; a bad request refuses the whole batch. A
        :class:`RequestSpec` is held to the limits; a :class:`CheckedRequest` (a batch file's) was checked already.

        ``metadata`` (up to 16 string pairs) is kept with the batch and shown by ``gpulb batch``.
        ``result_ttl_s`` overrides how long results stay once the batch is done; ``listed=False``
        keeps the batch out of ``gpulb batch list`` (short-lived batches, such as online requests).
        With ``durable_acks`` it returns once Redis has fsynced the batch (``NotDurable`` if it did not in time: the
        batch was accepted and runs, but may not survive a power loss).
        """
        model = validate_model(model)
        priority = validate_priority(priority)
        metadata = validate_metadata(metadata)
        result_ttl_s = validate_result_ttl(result_ttl_s)
        specs = validate_requests(requests, max_tokens=max_tokens, limits=self.settings.producer)
        batch_id = store.new_batch_id()
        with self._errors():
            self._check_durability()  # before anything is written: a ConfigError must not leave a batch running
            store.write_batch(
                self._conn,
                self._publish_conn,
                batch_id,
                model=model,
                priority=priority,
                specs=specs,
                limits=self.settings.producer if result_ttl_s is None
                else self.settings.producer.model_copy(update={"result_ttl_s": result_ttl_s}),
                metadata=metadata,
                listed=listed,
            )  # fmt: skip
            self._confirm_durable(f"batch {batch_id}")
        return BatchHandle(self, batch_id, total=len(specs))

    def list_batches(self, limit: int = 20) -> list[BatchStatus]:
        """The newest batches (finished ones too, until their results expire), newest first."""
        with self._errors():
            return store.list_batches(self._conn, limit)

    def get_batch(self, batch_id: str) -> BatchHandle:
        """Re-attach to a batch by id (from any process)."""
        status = self.batch_status(validate_batch_id(batch_id))
        return BatchHandle(self, batch_id, total=status.total)

    def batch_status(self, batch_id: str) -> BatchStatus:
        with self._errors():
            return read_batch_status(self._conn, batch_id)

    @property
    def connection(self) -> redis.Redis:
        """The Redis connection this client reads and writes with (text replies), for readers of what it writes."""
        return self._conn

    def close(self) -> None:
        self._conn.close()
        self._publish_conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _confirm_durable(self, what: str) -> None:
        """With ``durable_acks``: wait until what Redis acknowledged so far is on disk (checked once per client)."""
        if self.settings.redis.durable_acks:
            self._check_durability()
            confirm_durable(self._conn, self.settings, what)

    def _check_durability(self) -> None:
        if self.settings.redis.durable_acks and not self._durability_checked:
            check_durable_acks(self._conn, self.settings)
            self._durability_checked = True

    def _errors(self) -> Any:
        return broker_errors(self.settings.redis_url)

    def _wait_for(self, batch_id: str, probe: Callable[[], T | None], timeout: float | None, what: str) -> T:
        """Return ``probe()`` once it is not None, re-probing when the batch publishes progress.

        Blocks on the batch's pub/sub channel; a slow fallback re-probe covers missed messages.
        A Redis outage shorter than ``reconnect_grace_s`` is ridden out with bounded backoff.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outage_since: float | None = None
        delay = 0.1
        while True:
            try:
                return self._wait_subscribed(batch_id, probe, deadline, timeout, what)
            except CONNECTION_ERRORS as exc:
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > self.settings.producer.reconnect_grace_s:
                    raise unavailable(self.settings.redis_url, exc) from exc
                time.sleep(min(delay, max(0.0, (deadline or float("inf")) - time.monotonic())))
                delay = min(delay * 2, self.settings.redis.max_backoff_s)

    def _wait_subscribed(
        self, batch_id: str, probe: Callable[[], T | None], deadline: float | None, timeout: float | None, what: str
    ) -> T:
        fallback_s = self.settings.producer.poll_fallback_s
        pubsub = self._conn.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8
        try:
            pubsub.subscribe(keys.batch_events_channel(batch_id))
            while (value := probe()) is None:
                remaining = fallback_s if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise ResultTimeout(f"{what} not finished after {timeout} s")
                pubsub.get_message(timeout=min(remaining, fallback_s))
            return value
        finally:
            pubsub.close()


class BatchHandle:
    """A submitted batch. Cheap to create; every call reads Redis."""

    def __init__(self, client: Client, batch_id: str, *, total: int) -> None:
        self.client = client
        self.id = batch_id
        self.total = total

    def status(self) -> BatchStatus:
        """Counts (total, pending, running, completed, failed) and the batch's state."""
        return self.client.batch_status(self.id)

    def wait(self, timeout: float | None = None) -> BatchStatus:
        """Block until every request has a result; raises ``TimeoutError`` (ResultTimeout) on timeout."""

        def finished() -> BatchStatus | None:
            status = read_batch_status(self.client.connection, self.id)
            return status if status.finished else None

        return self.client._wait_for(self.id, finished, timeout, f"batch {self.id}")

    def cancel(self) -> BatchStatus:
        """Stop what has not started: requests still waiting are recorded as cancelled (``Result.cancelled``);
        requests already running finish. Returns the status right after."""
        status = self.status()
        with self.client._errors():
            store.cancel_batch(self.client.connection, self.client._scripts, self.id, status.model)
        return self.status()

    def results(self, timeout: float | None = None) -> list[Result]:
        """Every result in submission order, waiting up to ``timeout`` for the batch to finish."""
        self.wait(timeout)
        with self.client._errors():
            results = read_results(self.client.connection, self.id, self.total)
            self.client._confirm_durable(f"the results of batch {self.id}")
        return results

    def __repr__(self) -> str:
        return f"BatchHandle(id={self.id!r}, total={self.total})"


class JobHandle:
    """One submitted request."""

    def __init__(self, batch: BatchHandle, index: int) -> None:
        self.batch = batch
        self.index = index
        self.id = keys.request_id(batch.id, index)

    def result(self, timeout: float | None = None) -> Result:
        """The request's result, waiting up to ``timeout`` s; raises ``TimeoutError`` on timeout."""
        client = self.batch.client

        def probe() -> Result | None:
            return read_result(client.connection, self.batch.id, self.index)

        result = client._wait_for(self.batch.id, probe, timeout, f"request {self.id}")
        with client._errors():
            client._confirm_durable(f"the result of {self.id}")
        return result

    def stream(self, timeout: float | None = None) -> Iterator[str | Result]:
        """The answer's text piece by piece as the engine makes it, then its :class:`Result`.

        Submit with ``stream=True`` (``client.submit(prompt, model=..., stream=True)``); otherwise, or on a backend
        that cannot stream, the whole text comes as one piece with the result. Closing the iterator early does not
        stop the request; :meth:`abort` does.
        """
        client = self.batch.client
        with client._errors():
            for item in follow_text(client.connection, self.batch.id, self.index, timeout):
                if isinstance(item, Result):
                    client._confirm_durable(f"the result of {self.id}")
                yield item

    def abort(self) -> None:
        """Stop it: not started, it is cancelled; running, the engine drops it (streamed requests)."""
        with self.batch.client._errors():
            abort(self.batch.client.connection, self.batch.id)
        self.batch.cancel()

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r})"
