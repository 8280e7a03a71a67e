"""TensorRT-LLM in-process through its LLM API: ``generate_async`` per request, stats from the executor.

Load comes from ``get_stats`` (needs ``enable_iter_perf_stats=True``): the newest iteration's
``numActiveRequests``, ``numQueuedRequests`` and ``kvCacheStats`` (used / max blocks).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from gpulb.errors import BackendError, ConfigError
from gpulb.logs import get_logger
from worker.backends.base import Backend, BackendOutput, BackendRequest, EngineLoad, failed, import_engine, one_output

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


def load_from_iteration_stats(stats: dict[str, Any] | str) -> EngineLoad:
    """An engine load from one iteration-stats entry of ``LLM.get_stats`` (a dict; a JSON string in older releases)."""
    if isinstance(stats, str):
        stats = json.loads(stats)
    if not isinstance(stats, dict):
        return EngineLoad()
    kv = stats.get("kvCacheStats") or {}
    used, most = kv.get("usedNumBlocks"), kv.get("maxNumBlocks")
    return EngineLoad(
        running=stats.get("numActiveRequests"),
        waiting=stats.get("numQueuedRequests"),
        kv_cache_usage=used / most if used is not None and most else None,
    )


class TensorRTLLMBackend(Backend):
    name = "tensorrt-llm"

    def __init__(self, model: str, *, dtype: str = "auto", engine_args: dict[str, Any] | None = None) -> None:
        if not model:
            raise ConfigError("the tensorrt-llm backend needs a model: --model-path (or --model)")
        self.model, self.dtype, self.engine_args = model, dtype, dict(engine_args or {})
        self._llm: Any = None
        self._sampling_cls: Any = None
        self._last = EngineLoad()
        self._in_flight = 0
        self._generated = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        trt = import_engine("tensorrt_llm", "tensorrt")
        self._sampling_cls = trt.SamplingParams
        self._llm = trt.LLM(model=self.model, dtype=self.dtype, enable_iter_perf_stats=True, **self.engine_args)
        log.info("tensorrt-llm engine loaded", model=self.model, dtype=self.dtype)

    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        if self._llm is None:
            raise BackendError("tensorrt-llm backend used before start()")
        with self._lock:
            self._in_flight += len(requests)
        try:
            pending = [self._submit(r) for r in requests]
            outputs = [self._collect(p) for p in pending]
        finally:
            with self._lock:
                self._in_flight -= len(requests)
        with self._lock:
            self._generated += sum(o.output_tokens for o in outputs)
        return outputs

    def _submit(self, request: BackendRequest) -> Any:
        """The engine's future for a request, or the output saying why it could not be submitted."""
        try:
            prompt = request.prompt if request.messages is None else self._chat_prompt(request.messages)
            return self._llm.generate_async(prompt, self._sampling_cls(**trtllm_sampling_kwargs(request)))
        except (TypeError, ValueError) as exc:
            return failed(f"TensorRT-LLM refused the request: {exc}")

    @staticmethod
    def _collect(pending: Any) -> BackendOutput:
        if isinstance(pending, BackendOutput):
            return pending
        try:
            return output_from_trtllm(pending.result())
        except Exception as exc:
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
        except Exception as exc:
            log.debug("tensorrt-llm stats unavailable", error=str(exc))
            iterations = []
        if iterations:
            self._last = load_from_iteration_stats(iterations[-1])
        elif self._in_flight == 0:  # no iteration since the last look: the engine is idle
            self._last = EngineLoad(0, 0, self._last.kv_cache_usage)
        return EngineLoad(self._last.running, self._last.waiting, self._last.kv_cache_usage, self._generated)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
