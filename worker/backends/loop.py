"""An asyncio loop in a daemon thread, for backends whose engine client is asynchronous.

The engine's client lives on the loop; synchronous callers (the worker's threads) hand it coroutines.
The futures :meth:`EventLoopThread.submit` returns complete on the loop thread, so their done-callbacks
run there too (or at once, in the caller's thread, when added to a future already done, and in the
cancelling thread when cancelled): a callback must be quick and must never block or wait on the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")
JOIN_TIMEOUT_S = 5.0


class EventLoopThread:
    """Runs one asyncio loop forever in a daemon thread named ``name``."""

    def __init__(self, name: str = "gpulb-engine-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[Any]] = set()  # submitted and still running; touched on the loop only
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (never call this from the loop thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, func: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Start ``func(*args, **kwargs)`` on the loop; cancelling the future cancels it where it waits.

        The coroutine is made on the loop: one cancelled before it starts is never made (no "never awaited").
        """
        return asyncio.run_coroutine_threadsafe(self._tracked(func, *args, **kwargs), self.loop)

    def cancel_pending(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Cancel every submitted coroutine still running and wait (up to ``timeout``) for them to unwind."""
        self.run(self._cancel_tracked(timeout))

    def stop(self) -> None:
        """Stop the loop and its thread; what still runs on it is abandoned."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(JOIN_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()

    async def _tracked(self, func: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await func(*args, **kwargs)
        finally:
            self._tasks.discard(task)

    async def _cancel_tracked(self, timeout: float) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
