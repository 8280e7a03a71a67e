"""TensorRT-LLM in-process through its LLM API: ``generate_async`` per request, stats from the executor.

Each request is submitted on its own, as trtllm-serve does it: on an event-loop thread, ``generate_async``
then ``await result.aresult()`` (a result made outside a running loop cannot be awaited). ``abort``
cancels that coroutine, which calls the result's ``abort()``: the executor drops the request and frees its
slot. Futures complete, and run their callbacks, on that loop thread.

Load comes from ``get_stats`` (needs ``enable_iter_perf_stats=True``): the newest iteration's
``numActiveRequests``, ``numQueuedRequests`` and ``kvCacheStats`` (used / max blocks).
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import Future
from typing import Any

from gpulb.errors import BackendError, ConfigError
from gpulb.logs import get_logger
from worker.backends.base import (
    BackendOutput,
    BackendRequest,
    ContinuousBackend,
    EngineLoad,
    failed,
    import_engine,
    one_output,
    refused,
)
from worker.backends.loop import EventLoopThread

log = get_logger("gpulb.worker.trtllm")
STATS_TIMEOUT_S = 0.5


def trtllm_sampling_kwargs(request: BackendRequest) -> dict[str, Any]:
    """``tensorrt_llm.SamplingParams`` keyword arguments for a request.

    The names match ours; two meanings differ: top_k "off" is None there (not -1 or 0), and
    temperature 0 (greedy) is top_k=1 there, since TensorRT-LLM wants a temperature above 0.
    """
    kwargs = {**request.sampling, "max_tokens": request.max_tokens}
    if kwargs.get("top_k") in (-1, 0):
        del kwargs["top_k"]
    if kwargs.get("temperature") == 0:
        del kwargs["temperature"]
        kwargs["top_k"] = 1
    return kwargs


def output_from_trtllm(request_output: Any) -> BackendOutput:
    completion = one_output(list(request_output.outputs), "TensorRT-LLM")
    return BackendOutput(
        text=completion.text,
        output_tokens=len(completion.token_ids),
        prompt_tokens=len(getattr(request_output, "prompt_token_ids", None) or ()),
        finish_reason=completion.finish_reason,
    )


def iteration_dict(stats: dict[str, Any] | str) -> dict[str, Any]:
    """One iteration-stats entry of ``LLM.get_stats``: a dict (a JSON string in older releases)."""
    parsed = json.loads(stats) if isinstance(stats, str) else stats
    return parsed if isinstance(parsed, dict) else {}


def positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_from_iteration_stats(stats: dict[str, Any] | str) -> EngineLoad:
    """An engine load from one iteration-stats entry of ``LLM.get_stats``."""
    stats = iteration_dict(stats)
    if not stats:
        return EngineLoad()
    kv = stats.get("kvCacheStats") or {}
    used, most = kv.get("usedNumBlocks"), kv.get("maxNumBlocks")
    return EngineLoad(
        running=stats.get("numActiveRequests"),
        waiting=stats.get("numQueuedRequests"),
        kv_cache_usage=used / most if used is not None and most else None,
    )


class TensorRTLLMBackend(ContinuousBackend):
    name = "tensorrt-llm"

    def __init__(self, model: str, *, dtype: str = "auto", engine_args: dict[str, Any] | None = None) -> None:
        if not model:
            raise ConfigError("the tensorrt-llm backend needs a model: --model-path (or --model)")
        self.model, self.dtype, self.engine_args = model, dtype, dict(engine_args or {})
        self._llm: Any = None
        self._loop: EventLoopThread | None = None
        self._sampling_cls: Any = None
        self._last = EngineLoad()
        self._max_active: int | None = None  # maxNumActiveRequests, once an iteration's stats showed it
        self._in_flight = 0
        self._generated = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        trt = import_engine("tensorrt_llm", "tensorrt")
        self._sampling_cls = trt.SamplingParams
        self._llm = trt.LLM(model=self.model, dtype=self.dtype, enable_iter_perf_stats=True, **self.engine_args)
        self._loop = EventLoopThread("gpulb-trtllm-loop")
        log.info("tensorrt-llm engine loaded", model=self.model, dtype=self.dtype, slots=self.slots())

    def submit(self, request: BackendRequest) -> Future[BackendOutput]:
        """Start the request on the loop. ``abort`` (cancelling the future) aborts it in the executor."""
        if self._llm is None or self._loop is None:
            raise BackendError("tensorrt-llm backend used before start() or after shutdown()")
        return self._loop.submit(self._generate_one, request)

    def slots(self) -> int | None:
        """``max_batch_size``: asked for in the engine args, else the LLM's (its args, or the engine's build
        config), else the executor's ``maxNumActiveRequests`` once its stats have shown it; else None."""
        args = getattr(self._llm, "args", None)
        build_config = getattr(args, "build_config", None)
        candidates = (self.engine_args.get("max_batch_size"), getattr(args, "max_batch_size", None),
                      getattr(build_config, "max_batch_size", None), self._max_active)  # fmt: skip
        return next((n for n in map(positive_int, candidates) if n is not None), None)

    async def _generate_one(self, request: BackendRequest) -> BackendOutput:
        try:
            prompt = request.prompt if request.messages is None else self._chat_prompt(request.messages)
            pending = self._llm.generate_async(prompt, self._sampling_cls(**trtllm_sampling_kwargs(request)))
        except (TypeError, ValueError) as exc:
            return refused(f"TensorRT-LLM refused the request: {exc}")
        with self._lock:
            self._in_flight += 1
        try:
            output = await self._outcome(pending)
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            self._generated += output.output_tokens
        return output

    @staticmethod
    async def _outcome(pending: Any) -> BackendOutput:
        try:
            return output_from_trtllm(await pending.aresult())
        except asyncio.CancelledError:  # the worker gave up on the request: it must stop holding a slot
            pending.abort()
            raise
        except Exception as exc:  # the executor failed this request (RequestError); logged with its traceback
            log.warning("tensorrt-llm request failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            return failed(f"TensorRT-LLM failed the request: {type(exc).__name__}: {exc}")

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat template's text (as text, the engine would add a second BOS)."""
        tokenizer = self._llm.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def engine_load(self) -> EngineLoad:
        if self._llm is None:
            return EngineLoad()
        try:
            iterations = self._llm.get_stats(timeout=STATS_TIMEOUT_S)
        except Exception as exc:  # no stats is no load figure, never a failure
            log.debug("tensorrt-llm stats unavailable", error=str(exc))
            iterations = []
        if iterations:
            newest = iteration_dict(iterations[-1])
            self._last = load_from_iteration_stats(newest)
            self._max_active = positive_int(newest.get("maxNumActiveRequests")) or self._max_active
        elif self._in_flight == 0:  # no iteration since the last look: the engine is idle
            self._last = EngineLoad(0, 0, self._last.kv_cache_usage)
        return EngineLoad(self._last.running, self._last.waiting, self._last.kv_cache_usage, self._generated)

    def shutdown(self) -> None:
        """Abort what still runs (cancelling its coroutines aborts it in the executor), then stop the engine."""
        loop, self._loop = self._loop, None  # submit() refuses from now on
        if loop is not None:
            loop.cancel_pending()
            loop.stop()
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
