"""vLLM in-process: one ``AsyncLLM`` per worker, a micro-batch submitted as concurrent requests.

The engine batches continuously, so the micro-batch's requests are all handed to it at once and
each finishes on its own; outputs are FINAL_ONLY (no streaming deltas to throw away). Load comes
from a stat logger the engine calls every step (``num_running_reqs``, ``num_waiting_reqs``,
``kv_cache_usage``; vLLM marks these stats unstable, so every field is read defensively).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import uuid
from collections.abc import Coroutine
from typing import Any

from gpulb.errors import BackendError, ConfigError
from gpulb.logs import get_logger
from worker.backends.base import (
    Backend,
    BackendOutput,
    BackendRequest,
    EngineLoad,
    EngineUnavailable,
    failed,
    import_engine,
    one_output,
)

log = get_logger("gpulb.worker.vllm")
ABORTED = "abort"


def vllm_sampling_kwargs(request: BackendRequest) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for a request (our sampling fields share vLLM's names)."""
    return {**request.sampling, "max_tokens": request.max_tokens}


def output_from_vllm(request_output: Any) -> BackendOutput:
    """Map a final ``RequestOutput`` (its first ``CompletionOutput``) to a backend output."""
    completion = one_output(list(request_output.outputs), "vLLM")
    if completion.finish_reason == ABORTED:
        return failed("vLLM aborted the request", retryable=True)
    return BackendOutput(
        text=completion.text,
        output_tokens=len(completion.token_ids),
        prompt_tokens=len(request_output.prompt_token_ids or ()),
        finish_reason=completion.finish_reason,
    )


class EngineStats:
    """The latest scheduler figures and a running total of generated tokens, fed by the engine's loop."""

    def __init__(self) -> None:
        self.running: int | None = None
        self.waiting: int | None = None
        self.kv_cache_usage: float | None = None
        self.generated_tokens = 0

    def observe(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.running = getattr(scheduler_stats, "num_running_reqs", self.running)
            self.waiting = getattr(scheduler_stats, "num_waiting_reqs", self.waiting)
            self.kv_cache_usage = getattr(scheduler_stats, "kv_cache_usage", self.kv_cache_usage)
        if iteration_stats is not None:
            self.generated_tokens += int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)

    def load(self) -> EngineLoad:
        return EngineLoad(self.running, self.waiting, self.kv_cache_usage, self.generated_tokens)


def stat_logger_factory(stats: EngineStats, base: type) -> Any:
    """A ``StatLoggerBase`` subclass (built at run time: vLLM is imported only here) feeding ``stats``."""

    class GpulbStatLogger(base):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0, *args: Any, **kwargs: Any) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
            stats.observe(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            log.info("vllm engine initialized", engine_index=self.engine_index)

    return GpulbStatLogger


class EventLoopThread:
    """An asyncio loop in a daemon thread: the engine lives there; synchronous callers wait on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gpulb-engine-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", engine_args: dict[str, Any] | None = None) -> None:
        if not model:
            raise ConfigError("the vllm backend needs a model: --model-path (or --model) naming a directory or hub id")
        self.model, self.dtype, self.engine_args = model, dtype, dict(engine_args or {})
        self.stats = EngineStats()
        self._loop: EventLoopThread | None = None
        self._engine: Any = None
        self._sampling_cls: Any = None
        self._final_only: Any = None

    def start(self) -> None:
        vllm = import_engine("vllm", "vllm")
        loggers = import_engine("vllm.v1.metrics.loggers", "vllm")
        async_llm = import_engine("vllm.v1.engine.async_llm", "vllm")
        self._sampling_cls = vllm.SamplingParams
        self._final_only = import_engine("vllm.sampling_params", "vllm").RequestOutputKind.FINAL_ONLY
        args = vllm.AsyncEngineArgs(model=self.model, dtype=self.dtype, disable_log_stats=False, **self.engine_args)
        factory = stat_logger_factory(self.stats, loggers.StatLoggerBase)
        self._loop = EventLoopThread()

        async def create() -> Any:  # AsyncLLM starts its output task on the loop it is created in
            return async_llm.AsyncLLM.from_engine_args(args, stat_loggers=[factory])

        self._engine = self._loop.run(create())
        log.info("vllm engine loaded", model=self.model, dtype=self.dtype)

    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        if self._loop is None:
            raise BackendError("vllm backend used before start()")
        outputs: list[BackendOutput] = self._loop.run(self._generate_all(requests))
        return outputs

    async def _generate_all(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    async def _generate_one(self, request: BackendRequest) -> BackendOutput:
        try:
            prompt = request.prompt if request.messages is None else await self._chat_prompt(request.messages)
            params = self._sampling_cls(**vllm_sampling_kwargs(request), output_kind=self._final_only)
        except (TypeError, ValueError) as exc:  # vLLM refuses a parameter or the chat template fails
            return failed(f"vLLM refused the request: {exc}")
        final = None
        try:
            async for output in self._engine.generate(prompt, params, uuid.uuid4().hex):
                final = output
        except Exception as exc:
            if getattr(self._engine, "errored", False):
                raise EngineUnavailable(f"vLLM engine died: {type(exc).__name__}: {exc}") from exc
            return failed(f"vLLM failed the request: {type(exc).__name__}: {exc}")
        if final is None:
            return failed("vLLM returned no output", retryable=True)
        return output_from_vllm(final)

    async def _chat_prompt(self, messages: list[dict[str, Any]]) -> dict[str, list[int]]:
        """Token ids of the chat template's text: as text, vLLM would add a second BOS to the template's own."""
        tokenizer = self._engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # older vLLM: a coroutine
            tokenizer = await tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return {"prompt_token_ids": list(tokenizer.encode(text, add_special_tokens=False))}  # a TokensPrompt

    def engine_load(self) -> EngineLoad:
        return self.stats.load()

    def healthy(self) -> bool:
        if self._loop is None or self._engine is None:
            return False
        try:
            self._loop.run(self._engine.check_health(), timeout=10)
        except Exception as exc:
            log.warning("vllm health check failed", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
