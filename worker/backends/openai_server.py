"""A worker in front of a local OpenAI-compatible server: ``vllm serve``, ``trtllm-serve``, SGLang.

The server batches continuously on its own, so each request is one HTTP call, submitted as the worker's
slots free: an ``httpx.AsyncClient`` on an event-loop thread sends at most ``max_concurrency`` at once.
``abort`` cancels the call, which closes its connection: vLLM's server then aborts the request in its
engine. Futures complete, and run their callbacks, on that loop thread. An unreachable or overloaded server
(connection errors, 429/502/503/504) gives retryable outputs, which the worker retries with backoff; any
other error status fails only its request. Health and load (the server's Prometheus metrics, whichever
engine it is) go through a separate synchronous client, so that a full pool never makes a busy server
look dead. A streamed request (``on_text``) is sent with ``"stream": true`` and its server-sent events
feed ``on_text`` as they arrive; the others are sent, and answered, whole.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gpulb.connection import redact_url
from gpulb.errors import BackendError, ConfigError
from gpulb.logs import get_logger
from worker.backends.base import (
    BackendOutput,
    BackendRequest,
    ContinuousBackend,
    EngineLoad,
    TextSink,
    embedded,
    failed,
)
from worker.backends.loop import EventLoopThread

if TYPE_CHECKING:
    from gpulb.settings import WorkerSettings

log = get_logger("gpulb.worker.openai")

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
METRICS_PATHS = ("/metrics", "/prometheus/metrics")  # vLLM and SGLang; trtllm-serve
# vLLM's whole config, its scheduler's max_num_seqs included; served only with VLLM_SERVER_DEV_MODE=1.
SERVER_INFO_PATH = "/server_info?config_format=json"
SERVER_INFO_TIMEOUT_S = 15.0  # its first answer collects the environment: seconds

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# The server did not (fully) answer: nothing is known about the request itself.
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
ERROR_CHARS = 300
CONTROL_TIMEOUT_S = 2.0
POLL_S = 0.5
PROGRESS_LOG_S = 10.0

# Prometheus sample names, per engine, in order of preference. Counters keep their ``_total`` suffix
# here: the parser strips it from family names, never from sample names.
RUNNING = ("vllm:num_requests_running", "trtllm_num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "trtllm_num_requests_waiting", "sglang:num_queue_reqs")
KV_CACHE_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "trtllm_kv_cache_utilization",
                  "sglang:token_usage")  # fmt: skip
GENERATED_TOKENS = ("vllm:generation_tokens_total", "trtllm_generation_tokens_total")


class OpenAIServerBackend(ContinuousBackend):
    """Sends each request to ``{base_url}/v1/completions`` or ``/v1/chat/completions``."""

    name = "openai"
    can_embed = True  # through the server's /v1/embeddings: a server without it answers each such request a 404

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        request_timeout_s: float = 600,
        startup_timeout_s: float = 900,
        max_concurrency: int = 256,
        metrics_path: str | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigError("max_concurrency must be >= 1")
        self.base_url = server_root(base_url)
        self.model = model
        self.startup_timeout_s = startup_timeout_s
        self.max_concurrency = max_concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        timeout = httpx.Timeout(request_timeout_s, connect=min(request_timeout_s, 30.0))
        self._loop = EventLoopThread("gpulb-openai-loop")
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits, timeout=timeout)
        self._in_flight = asyncio.Semaphore(max_concurrency)  # used on the loop only
        # Health and metrics get their own connections: requests that fill the pool must not make a busy
        # server look dead to the heartbeat.
        self._control = httpx.Client(base_url=self.base_url, headers=headers, timeout=CONTROL_TIMEOUT_S,
                                     limits=httpx.Limits(max_connections=4))  # fmt: skip
        self._metrics_paths = (metrics_path,) if metrics_path else METRICS_PATHS
        self._metrics_warned = False
        self._server_slots: int | None = None
        self._closed = threading.Event()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> OpenAIServerBackend:
        if not settings.base_url:
            raise ConfigError("the openai backend needs --base-url (e.g. http://localhost:8000)")
        model = settings.served_model or settings.model
        if not model:
            raise ConfigError("the openai backend needs --model (or --served-model): the name the server serves")
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.base_url, model, api_key=api_key, request_timeout_s=settings.request_timeout_s,
                   startup_timeout_s=settings.startup_timeout_s, max_concurrency=settings.max_concurrency,
                   metrics_path=settings.metrics_path)  # fmt: skip

    def __repr__(self) -> str:
        return f"OpenAIServerBackend(base_url={redact_url(self.base_url)!r}, model={self.model!r})"

    def start(self) -> None:
        """Wait for the server's /health to answer 200, check that it serves the model, ask for its slots."""
        url = f"{redact_url(self.base_url)}{HEALTH_PATH}"
        started = last_log = time.monotonic()
        log.info("waiting for the engine server", url=url, timeout_s=self.startup_timeout_s)
        while not self.healthy():
            now = time.monotonic()
            if now - started >= self.startup_timeout_s:
                raise BackendError(f"the engine server at {url} was not healthy within {self.startup_timeout_s:g} s")
            if now - last_log >= PROGRESS_LOG_S:
                log.info("still waiting for the engine server", url=url, waited_s=round(now - started, 1))
                last_log = now
            if self._closed.wait(min(POLL_S, max(0.0, started + self.startup_timeout_s - now))):
                raise BackendError(f"shut down while waiting for the engine server at {url}")
        log.info("engine server is up", url=url, waited_s=round(time.monotonic() - started, 1))
        self._check_model()
        self._server_slots = self._fetch_server_slots()

    def submit(self, request: BackendRequest) -> Future[BackendOutput]:
        """Send the request from the loop thread once fewer than ``max_concurrency`` are in flight."""
        if self._closed.is_set():
            raise BackendError("openai backend used after shutdown()")
        return self._loop.submit(self._send, request)

    def slots(self) -> int:
        """``max_concurrency``, or the server engine's max_num_seqs where the server tells it and it is fewer."""
        return min(self.max_concurrency, self._server_slots or self.max_concurrency)

    def healthy(self) -> bool:
        try:
            return self._control.get(HEALTH_PATH).status_code == 200
        except (httpx.HTTPError, RuntimeError):  # RuntimeError: the client is closed
            return False

    def engine_load(self) -> EngineLoad:
        text = self._scrape_metrics()
        return EngineLoad() if text is None else parse_engine_metrics(text)

    def shutdown(self) -> None:
        """Cancel what is in flight (closing its connections), then close both clients and the loop."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._loop.cancel_pending()
        self._loop.run(self._client.aclose())
        self._loop.stop()
        self._control.close()

    async def _send(self, request: BackendRequest) -> BackendOutput:
        async with self._in_flight:
            return await self._post(request)

    async def _post(self, request: BackendRequest) -> BackendOutput:
        path, body = request_body(self.model, request)
        try:
            if path == EMBEDDINGS_PATH:
                return await self._embed(body)
            if request.on_text is not None:
                return await self._stream(path, body, request.on_text)
            response = await self._client.post(path, json=body)
        except RETRYABLE_ERRORS as exc:
            return failed(f"engine server unreachable ({path}): {type(exc).__name__}: {exc}", retryable=True)
        except httpx.HTTPError as exc:
            return failed(f"engine server request failed ({path}): {type(exc).__name__}: {exc}")
        if response.status_code != 200:
            return http_failure(path, response)
        return parse_completion(response)

    async def _embed(self, body: dict[str, Any]) -> BackendOutput:
        """The server's own ``/v1/embeddings`` (``vllm serve --runner pooling``, TEI, SGLang), in floats."""
        response = await self._client.post(EMBEDDINGS_PATH, json=body)
        if response.status_code != 200:
            return http_failure(EMBEDDINGS_PATH, response)
        return parse_embeddings(response)

    async def _stream(self, path: str, body: dict[str, Any], on_text: TextSink) -> BackendOutput:
        """POST with ``stream``; a cancelled call leaves the ``async with``, which closes the connection."""
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with self._client.stream("POST", path, json=streamed) as response:
            if response.status_code != 200:
                await response.aread()
                return http_failure(path, response)
            events = StreamedCompletion(path, on_text)
            async for line in response.aiter_lines():  # read to its end, past [DONE]: the connection is kept
                events.feed(line)
                if events.error is not None:
                    break  # closing the connection stops the server generating
            return events.output()

    def _check_model(self) -> None:
        try:
            response = self._control.get(MODELS_PATH)
            served = [m["id"] for m in response.json()["data"]] if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not list the server's models", error=f"{type(exc).__name__}: {exc}")
            return
        if served and self.model not in served:  # every request would fail with a 404: do not take work
            raise ConfigError(f"the server at {redact_url(self.base_url)} serves {served}, not {self.model!r}: "
                              "set --served-model to one of them")  # fmt: skip

    def _fetch_server_slots(self) -> int | None:
        """vLLM's ``max_num_seqs``, from /server_info; None where the server does not serve it (the default)."""
        try:
            response = self._control.get(SERVER_INFO_PATH, timeout=SERVER_INFO_TIMEOUT_S)
            scheduler = response.json()["vllm_config"]["scheduler_config"] if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.debug("no scheduler config from the server", error=f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(scheduler, dict):
            return None
        said = scheduler.get("max_num_active_seqs") or scheduler.get("max_num_seqs")
        return said if isinstance(said, int) and said > 0 else None

    def _scrape_metrics(self) -> str | None:
        text, why = self._fetch_metrics()
        if why is not None and not self._metrics_warned:  # the heartbeat asks every second: say it once
            log.warning("engine metrics unavailable", url=redact_url(self.base_url), error=why)
            self._metrics_warned = True
        return text

    def _fetch_metrics(self) -> tuple[str | None, str | None]:
        """(the metrics text, None) from the first path that exists (remembered), or (None, why not)."""
        for path in self._metrics_paths:
            try:
                response = self._control.get(path)
            except (httpx.HTTPError, RuntimeError) as exc:
                return None, f"{path}: {type(exc).__name__}: {exc}"
            if response.status_code == 200:
                self._metrics_paths = (path,)
                return response.text, None
            if response.status_code != 404:
                return None, f"{path}: HTTP {response.status_code}"
        return None, f"none of {', '.join(self._metrics_paths)} exists"


def server_root(base_url: str) -> str:
    """``http://host:8000/v1/`` -> ``http://host:8000``: the API paths are added to the server's root."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url must be an http:// or https:// URL, not {redact_url(url)!r}")
    return url.removesuffix("/v1").rstrip("/")


def parse_embeddings(response: httpx.Response) -> BackendOutput:
    """An embeddings response body as an output, its vectors in input order; a malformed body fails the request."""
    try:
        payload = response.json()
        data = sorted(payload["data"], key=lambda item: int(item["index"]))
        vectors = [[float(x) for x in item["embedding"]] for item in data]
        return embedded(vectors, int((payload.get("usage") or {}).get("prompt_tokens", 0)))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return failed(f"malformed embeddings from the engine server: {type(exc).__name__}: {exc}; "
                      f"body: {response.text[:ERROR_CHARS]!r}")  # fmt: skip


def request_body(model: str, request: BackendRequest) -> tuple[str, dict[str, Any]]:
    """The path and JSON body for one request; sampling fields go in as they are (vLLM and SGLang
    take the ones OpenAI does not define)."""
    if request.inputs is not None:
        return EMBEDDINGS_PATH, {"model": model, "input": request.inputs, "encoding_format": "float"}
    body: dict[str, Any] = {**request.sampling, "model": model, "max_tokens": request.max_tokens}
    if request.messages is not None:
        return CHAT_PATH, {**body, "messages": request.messages}
    return COMPLETIONS_PATH, {**body, "prompt": request.prompt}


def http_failure(path: str, response: httpx.Response) -> BackendOutput:
    retryable = response.status_code in RETRYABLE_STATUSES
    return failed(f"HTTP {response.status_code} from {path}: {error_message(response)}", retryable=retryable,
                  status=None if retryable else response.status_code)  # fmt: skip


class StreamedCompletion:
    """Folds a streamed completion's or chat completion's server-sent events (``data: {chunk}`` lines, then
    ``data: [DONE]``) into one output, handing each non-empty piece of text to ``on_text`` as it comes."""

    def __init__(self, path: str, on_text: TextSink) -> None:
        self.path, self.on_text = path, on_text
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}
        self.done = False
        self.error: str | None = None

    def feed(self, line: str) -> None:
        """One line of the stream; other SSE fields, comments and the blank lines between events say nothing."""
        if self.done or self.error is not None or not line.startswith("data:"):
            return
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            piece = self._chunk(json.loads(data))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            self.error = (f"malformed stream from the engine server ({self.path}): {type(exc).__name__}: {exc}; "
                          f"chunk: {data[:ERROR_CHARS]!r}")  # fmt: skip
            return
        if piece:
            self.pieces.append(piece)
            self.on_text(piece)  # outside the try: the sink's own errors are not the server's

    def _chunk(self, chunk: dict[str, Any]) -> str | None:
        """The chunk's piece of text; its finish reason, usage or error are kept."""
        if "error" in chunk or chunk.get("object") == "error":  # vLLM's error mid-stream, then [DONE]
            self.error = f"error in the stream from {self.path}: {error_text(chunk)}"
            return None
        if chunk.get("usage"):
            self.usage = {key: int(chunk["usage"][key]) for key in ("prompt_tokens", "completion_tokens")}
        choices = chunk.get("choices") or []  # none in the usage chunk
        return self._choice(choices[0]) if choices else None

    def _choice(self, choice: dict[str, Any]) -> str | None:
        piece = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content")
        finish = choice.get("finish_reason")
        if not isinstance(piece, str | None) or not isinstance(finish, str | None):
            raise TypeError("text and finish_reason must be strings")
        self.finish_reason = finish or self.finish_reason
        return piece

    def output(self) -> BackendOutput:
        if self.error is not None:
            return failed(self.error)
        if not self.done and self.finish_reason is None:  # the server closed the stream early: it said nothing
            return failed(f"the stream from {self.path} ended before [DONE]", retryable=True)
        # A server that sends no usage chunk (it ignores stream_options): each piece of text holds at least one
        # token, so their count is a lower bound on the output's tokens; the prompt's count is unknown (0).
        output_tokens = self.usage.get("completion_tokens", len(self.pieces))
        return BackendOutput("".join(self.pieces), output_tokens, prompt_tokens=self.usage.get("prompt_tokens", 0),
                             finish_reason=self.finish_reason)  # fmt: skip


def parse_completion(response: httpx.Response) -> BackendOutput:
    """A completion or chat completion response body as an output; a malformed body fails the request."""
    try:
        payload = response.json()
        choice = payload["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        usage = payload.get("usage") or {}
        finish = choice.get("finish_reason")
        if not isinstance(text, str | None) or not isinstance(finish, str | None):
            raise TypeError("text and finish_reason must be strings")
        return BackendOutput(text=text or "", output_tokens=int(usage.get("completion_tokens", 0)),
                             prompt_tokens=int(usage.get("prompt_tokens", 0)), finish_reason=finish)  # fmt: skip
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return failed(f"malformed response from the engine server: {type(exc).__name__}: {exc}; "
                      f"body: {response.text[:ERROR_CHARS]!r}")  # fmt: skip


def error_message(response: httpx.Response) -> str:
    """The server's own words about an error, whichever shape its body has, truncated."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    return error_text(payload, response.text or response.reason_phrase)


def error_text(payload: Any, default: Any = None) -> str:
    """The message of an error body (``default``, else the whole body, if it holds none), truncated."""
    message: Any = payload if default is None else default
    if isinstance(payload, dict):
        error = payload.get("error")
        # OpenAI and current vLLM: {"error": {"message"}}; older vLLM: {"message"}; FastAPI: {"detail"}
        found = error.get("message") if isinstance(error, dict) else error
        message = found or payload.get("message") or payload.get("detail") or message
    text = str(message)
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def parse_engine_metrics(text: str) -> EngineLoad:
    """Load from an engine server's Prometheus text (vLLM, TensorRT-LLM or SGLang names).

    Counts are summed over label sets (several engines behind one server); the KV cache usage is
    their mean. A metric the text lacks stays None; text that does not parse gives ``EngineLoad()``.
    """
    try:
        samples = sample_values(text)
    except ValueError:
        return EngineLoad()
    running, waiting, generated = (first_present(samples, names) for names in (RUNNING, WAITING, GENERATED_TOKENS))
    kv_values = first_present(samples, KV_CACHE_USAGE)
    kv_usage = None if kv_values is None else min(1.0, max(0.0, sum(kv_values) / len(kv_values)))
    return EngineLoad(running=int_sum(running), waiting=int_sum(waiting), kv_cache_usage=kv_usage,
                      generated_tokens=int_sum(generated))  # fmt: skip


def sample_values(text: str) -> dict[str, list[float]]:
    """Every finite sample value, by sample name."""
    values: dict[str, list[float]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if math.isfinite(sample.value):
                values[sample.name].append(sample.value)
    return values


def first_present(samples: dict[str, list[float]], names: Iterable[str]) -> list[float] | None:
    return next((samples[name] for name in names if samples.get(name)), None)


def int_sum(values: list[float] | None) -> int | None:
    return None if values is None else round(sum(values))
