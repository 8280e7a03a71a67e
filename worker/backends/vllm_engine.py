"""vLLM in-process: one ``AsyncLLM`` per worker, each request submitted on its own as the worker's slots free.

The engine batches continuously: ``submit`` starts one request as a coroutine on the engine's own event-loop
thread and returns its future, which completes when that request does; outputs are FINAL_ONLY (no streaming
deltas to throw away), except for a streamed request (``on_text``): DELTA, each new piece of text handed to
``on_text`` on the loop thread and the pieces folded into the same final output. ``abort`` cancels the
coroutine: ``AsyncLLM.generate`` is closed where it waits, and vLLM aborts the request in the engine,
freeing its slot. Futures complete, and run their callbacks, on that loop thread. Load comes from a stat
logger the engine calls every step (``num_running_reqs``, ``num_waiting_reqs``, ``kv_cache_usage``; vLLM
marks these stats unstable, so every field is read defensively).

Prompts go to the engine rendered by its own renderer where it has one (vLLM deprecates raw prompts), and
a ``max_tokens`` above ``max_model_len`` fails the request, as ``vllm serve`` answers it with a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import uuid
from concurrent.futures import Future
from typing import Any

from gpulb.errors import BackendError, ConfigError
from gpulb.logs import get_logger
from worker.backends.base import (
    BackendOutput,
    BackendRequest,
    ContinuousBackend,
    EngineLoad,
    EngineUnavailable,
    TextSink,
    embedded,
    failed,
    import_engine,
    one_output,
    refused,
)
from worker.backends.loop import EventLoopThread

log = get_logger("gpulb.worker.vllm")
ABORTED = "abort"
BUSY_STATUSES = frozenset({429, 503})  # vLLM's admission control (max_num_queued_reqs / _tokens) answers 503
HEALTH_TIMEOUT_S = 10.0


def vllm_sampling_kwargs(request: BackendRequest) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for a request (our sampling fields share vLLM's names)."""
    return {**request.sampling, "max_tokens": request.max_tokens}


def output_from_vllm(request_output: Any) -> BackendOutput:
    """Map a final ``RequestOutput`` (its first ``CompletionOutput``) to a backend output."""
    completion = one_output(list(request_output.outputs), "vLLM")
    return finished_output(completion.text, len(completion.token_ids), len(request_output.prompt_token_ids or ()),
                           completion.finish_reason)  # fmt: skip


def finished_output(text: str, output_tokens: int, prompt_tokens: int, finish_reason: str | None) -> BackendOutput:
    if finish_reason == ABORTED:
        return failed("vLLM aborted the request", retryable=True)
    return BackendOutput(text, output_tokens, prompt_tokens=prompt_tokens, finish_reason=finish_reason)


class FinalOutput:
    """Keeps the last ``RequestOutput`` of a FINAL_ONLY request: there is only one."""

    def __init__(self) -> None:
        self.last: Any = None

    def add(self, request_output: Any) -> None:
        self.last = request_output

    def output(self) -> BackendOutput | None:
        return None if self.last is None else output_from_vllm(self.last)


class DeltaOutputs:
    """Folds a DELTA request's outputs (each holds only what is new) into what FINAL_ONLY would have given,
    handing each new piece of text to ``on_text`` as it comes."""

    def __init__(self, on_text: TextSink) -> None:
        self.on_text = on_text
        self.pieces: list[str] = []
        self.output_tokens = 0
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None

    def add(self, request_output: Any) -> None:
        completion = one_output(list(request_output.outputs), "vLLM")
        if self.prompt_tokens is None:
            self.prompt_tokens = len(request_output.prompt_token_ids or ())
        self.output_tokens += len(completion.token_ids)
        self.finish_reason = completion.finish_reason
        if completion.text:  # a step may add tokens but no text (held back at a stop string's possible start)
            self.pieces.append(completion.text)
            self.on_text(completion.text)

    def output(self) -> BackendOutput | None:
        if self.prompt_tokens is None:
            return None
        return finished_output("".join(self.pieces), self.output_tokens, self.prompt_tokens, self.finish_reason)


def collector(request: BackendRequest) -> FinalOutput | DeltaOutputs:
    return FinalOutput() if request.on_text is None else DeltaOutputs(request.on_text)


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


def refusal_types() -> tuple[type[BaseException], ...]:
    """The errors that say the request itself is invalid: ``vllm serve`` answers them with a 4xx."""
    try:  # recent vLLM; older releases raise ValueError (or TypeError) for a bad request
        client_error: type[BaseException] = importlib.import_module("vllm.exceptions").VLLMClientError
    except (ImportError, AttributeError):
        return (TypeError, ValueError)
    return (TypeError, ValueError, client_error)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status vLLM attaches to an error it would answer with one (``GracefulHTTPError``)."""
    status = getattr(exc, "http_status", None)
    return int(status) if isinstance(status, int) else None


def describe(exc: BaseException) -> str:
    """``Type: message``, with the cause when vLLM wraps one in a bare error (``EngineGenerateError``)."""
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    cause = exc.__cause__
    return text if cause is None else f"{text} (from {type(cause).__name__}: {cause})"


def budget_error(max_tokens: int, max_model_len: int | None) -> str | None:
    """Why a request asking for more tokens than the context holds is refused; vLLM's server says the same."""
    if max_model_len is None or max_tokens <= max_model_len:
        return None
    return (f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.")  # fmt: skip


def positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class VllmBackend(ContinuousBackend):
    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", engine_args: dict[str, Any] | None = None) -> None:
        if not model:
            raise ConfigError("the vllm backend needs a model: --model-path (or --model) naming a directory or hub id")
        self.model, self.dtype, self.engine_args = model, dtype, dict(engine_args or {})
        # a pooling model (engine_args {"runner": "pooling"}, e.g. with "convert": "embed") embeds; it cannot generate
        self.can_embed = self.engine_args.get("runner") == "pooling"
        self.stats = EngineStats()
        self._loop: EventLoopThread | None = None
        self._engine: Any = None
        self._sampling_cls: Any = None
        self._final_only: Any = None
        self._delta: Any = None
        self._pooling_cls: Any = None
        self._refusals: tuple[type[BaseException], ...] = (TypeError, ValueError)

    def start(self) -> None:
        vllm = import_engine("vllm", "vllm")
        loggers = import_engine("vllm.v1.metrics.loggers", "vllm")
        async_llm = import_engine("vllm.v1.engine.async_llm", "vllm")
        self._sampling_cls, self._pooling_cls = vllm.SamplingParams, vllm.PoolingParams
        output_kinds = import_engine("vllm.sampling_params", "vllm").RequestOutputKind
        self._final_only, self._delta = output_kinds.FINAL_ONLY, output_kinds.DELTA
        self._refusals = refusal_types()
        args = vllm.AsyncEngineArgs(model=self.model, dtype=self.dtype, disable_log_stats=False, **self.engine_args)
        factory = stat_logger_factory(self.stats, loggers.StatLoggerBase)
        self._loop = EventLoopThread("gpulb-vllm-loop")

        async def create() -> Any:  # AsyncLLM starts its output task on the loop it is created in
            return async_llm.AsyncLLM.from_engine_args(args, stat_loggers=[factory])

        self._engine = self._loop.run(create())
        log.info("vllm engine loaded", model=self.model, dtype=self.dtype, slots=self.slots(),
                 max_model_len=self.max_model_len())  # fmt: skip

    def submit(self, request: BackendRequest) -> Future[BackendOutput]:
        """Start the request on the engine's loop. ``abort`` (cancelling the future) aborts it in the engine."""
        if self._loop is None or self._engine is None:
            raise BackendError("vllm backend used before start() or after shutdown()")
        return self._loop.submit(self._generate_one, request)

    def slots(self) -> int | None:
        """The scheduler's limit on running sequences: ``max_num_active_seqs`` if set, else ``max_num_seqs``."""
        scheduler = getattr(getattr(self._engine, "vllm_config", None), "scheduler_config", None)
        candidates = (getattr(scheduler, "max_num_active_seqs", None), getattr(scheduler, "max_num_seqs", None),
                      self.engine_args.get("max_num_seqs"))  # fmt: skip
        return next((n for n in map(positive_int, candidates) if n is not None), None)

    def max_model_len(self) -> int | None:
        """The context length the engine was built with (its config), else the one asked for, else None."""
        built = positive_int(getattr(getattr(self._engine, "model_config", None), "max_model_len", None))
        return built or positive_int(self.engine_args.get("max_model_len"))

    async def _generate_one(self, request: BackendRequest) -> BackendOutput:
        if request.inputs is not None:
            return await self._embed(request.inputs)
        too_long = budget_error(request.max_tokens, self.max_model_len())
        if too_long is not None:
            return refused(f"vLLM refused the request: {too_long}")
        try:
            prompt = await self._engine_input(request)
            kind = self._final_only if request.on_text is None else self._delta
            params = self._sampling_cls(**vllm_sampling_kwargs(request), output_kind=kind)
        except self._refusals as exc:  # vLLM refuses a parameter, the prompt's length, or the chat template fails
            return refused(f"vLLM refused the request: {exc}")
        return await self._run(prompt, params, collector(request))

    async def _run(self, prompt: Any, params: Any, outputs: FinalOutput | DeltaOutputs) -> BackendOutput:
        request_id = uuid.uuid4().hex
        try:
            # aclosing: should on_text raise, the generator is closed at once, which aborts the request in vLLM
            async with contextlib.aclosing(self._engine.generate(prompt, params, request_id)) as stream:
                async for output in stream:
                    outputs.add(output)
        except asyncio.CancelledError:
            # Closing generate() aborts the request, unless it was cancelled while adding it (its own handler
            # then knows no request yet); aborting an ended request again does nothing.
            await self._engine.abort(request_id)
            raise
        except self._refusals as exc:
            return refused(f"vLLM refused the request: {exc}")
        except Exception as exc:  # mapped to an output, or to EngineUnavailable; logged with its traceback
            return self._failure(exc)
        final = outputs.output()
        return failed("vLLM returned no output", retryable=True) if final is None else final

    async def _embed(self, texts: list[str]) -> BackendOutput:
        """One ``encode`` per text, all at once (the engine batches them); vLLM's embed pooler normalises."""
        tasks = [asyncio.ensure_future(self._pool(text)) for text in texts]
        try:
            pooled = await asyncio.gather(*tasks)
        except BaseException as exc:
            for task in tasks:  # one refused (or the whole request cancelled): the others stop holding the engine
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not isinstance(exc, Exception):
                raise
            return self._embedding_failure(exc)
        vectors = [[float(x) for x in output.outputs.data.tolist()] for output in pooled]
        return embedded(vectors, sum(len(output.prompt_token_ids) for output in pooled))

    def _embedding_failure(self, exc: Exception) -> BackendOutput:
        if isinstance(exc, self._refusals):
            return refused(f"vLLM refused the request: {exc}")
        return self._failure(exc)

    async def _pool(self, text: str) -> Any:
        request_id, final = uuid.uuid4().hex, None
        try:
            async for output in self._engine.encode(text, self._pooling_cls(task="embed"), request_id):
                final = output
        except asyncio.CancelledError:
            await self._engine.abort(request_id)
            raise
        if final is None:
            raise BackendError("vLLM returned no embedding")
        return final

    def _failure(self, exc: Exception) -> BackendOutput:
        if getattr(self._engine, "errored", False):
            raise EngineUnavailable(f"vLLM engine died: {describe(exc)}") from exc
        if http_status(exc) in BUSY_STATUSES:
            return failed(f"vLLM is busy: {exc}", retryable=True)
        log.warning("vllm request failed", error=describe(exc), exc_info=exc)
        return failed(f"vLLM failed the request: {describe(exc)}")

    async def _engine_input(self, request: BackendRequest) -> Any:
        """What ``AsyncLLM.generate`` takes: the prompt rendered by the engine's renderer (vLLM deprecates raw
        prompts), or, in releases without one, the TextPrompt / TokensPrompt they render themselves."""
        if request.messages is None:
            prompt: dict[str, Any] = {"prompt": request.prompt}  # a TextPrompt
        else:
            prompt = {"prompt_token_ids": await self._chat_token_ids(request.messages)}  # a TokensPrompt
        renderer = getattr(self._engine, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl_async"):
            return prompt
        (engine_input,) = await renderer.render_cmpl_async([prompt], renderer.default_cmpl_tok_params)
        return engine_input

    async def _chat_token_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat template's text: as text, vLLM would add a second BOS to the template's own."""
        tokenizer = self._engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # older vLLM: a coroutine
            tokenizer = await tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def engine_load(self) -> EngineLoad:
        return self.stats.load()

    def healthy(self) -> bool:
        loop, engine = self._loop, self._engine
        if loop is None or engine is None:
            return False
        try:
            loop.run(engine.check_health(), timeout=HEALTH_TIMEOUT_S)
        except Exception as exc:  # any failure of the probe means "not healthy"
            log.warning("vllm health check failed", error=describe(exc))
            return False
        return True

    def dead(self) -> bool:
        return bool(getattr(self._engine, "errored", False))

    def shutdown(self) -> None:
        """Abort what still runs, then shut the engine down on its own loop (from another thread, its output
        handler sees the engine core vanish and logs an EngineDeadError)."""
        loop, self._loop = self._loop, None  # submit() refuses from now on
        if loop is None:
            return
        loop.cancel_pending()
        if self._engine is not None:
            loop.run(shut_down(self._engine))
            self._engine = None
        loop.stop()


async def shut_down(engine: Any) -> None:
    engine.shutdown()
