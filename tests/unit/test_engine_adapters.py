"""The vLLM and TensorRT-LLM adapters' mapping of params and outputs, NVML's device mapping.

The engines need a GPU, so here they are replaced by stand-ins with the engines' own signatures
(``SamplingParams`` with exactly vLLM's / TensorRT-LLM's field names, ``AsyncLLM.generate`` as an
async generator that aborts the request when it is closed, ``generate_async`` returning a result to
``aresult()`` and ``abort()``): a name we send that the engine does not take fails these tests. The
adapters run on the real engines on a GPU (see the README); the vLLM ones also on vLLM's CPU build.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from gpulb.errors import BackendError, ConfigError
from gpulb.settings import BackendName, WorkerSettings
from worker.backends import create_backend
from worker.backends.base import BackendOutput, BackendRequest, EngineLoad, EngineUnavailable
from worker.backends.trtllm import TensorRTLLMBackend, load_from_iteration_stats, trtllm_sampling_kwargs
from worker.backends.vllm_engine import DeltaOutputs, EngineStats, VllmBackend, output_from_vllm, vllm_sampling_kwargs
from worker.gpu import GpuMonitor, count_gpus, parse_gpu_list, pin_to_gpu, visible_device

SAMPLING = {"temperature": 0.0, "top_p": 0.9, "top_k": -1, "seed": 7, "stop": ["\n"], "min_tokens": 2,
            "presence_penalty": 0.5, "frequency_penalty": 0.1, "repetition_penalty": 1.1, "min_p": 0.05,
            "ignore_eos": False}  # fmt: skip
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
HOLD = "@@hold"  # a stand-in engine keeps a request holding this running until released (or aborted)


def completion(text: str, tokens: int, reason: str | None = "stop") -> SimpleNamespace:
    return SimpleNamespace(index=0, text=text, token_ids=list(range(tokens)), finish_reason=reason)


def delta_outputs(text: str, max_tokens: int) -> list[SimpleNamespace]:
    """What DELTA gives for FINAL_ONLY's ``<text>``: pieces of 3 characters, the second step adding tokens
    but no text (vLLM holds text back that may start a stop string), ``max_tokens`` token ids in all."""
    answer = f"<{text}>"
    pieces = [answer[:3], "", *(answer[i : i + 3] for i in range(3, len(answer), 3))]
    sizes = [max_tokens // len(pieces) + (i < max_tokens % len(pieces)) for i in range(len(pieces))]
    reasons = [None] * (len(pieces) - 1) + ["abort" if "@@abort" in text else "length"]
    return [SimpleNamespace(prompt_token_ids=text.split(), outputs=[completion(piece, size, reason)])
            for piece, size, reason in zip(pieces, sizes, reasons, strict=True)]  # fmt: skip


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def callback_thread(future: Future[Any]) -> Future[str]:
    """The name of the thread that runs ``future``'s done-callbacks."""
    name: Future[str] = Future()
    future.add_done_callback(lambda _: name.set_result(threading.current_thread().name))
    return name


# -- vLLM ------------------------------------------------------------------------------------------


@dataclass
class VllmSamplingParams:  # vLLM's SamplingParams field names (ENGINES.md)
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    output_kind: str = "CUMULATIVE"


class FakeTokenizer:
    """A chat template that joins role=content; token ids are character codes, with no BOS added."""

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "|".join(f"{m['role']}={m['content']}" for m in messages)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        assert add_special_tokens is False  # the template's text carries its own BOS, if any
        return [ord(c) for c in text]


class VLLMClientError(Exception):  # vllm.exceptions: the request's fault (the server answers 4xx)
    pass


class EngineGenerateError(Exception):  # vllm.v1.engine.exceptions: generate() failed, cause chained
    pass


class EngineDeadError(Exception):
    pass


class QueueOverflowError(Exception):  # a GracefulHTTPError: admission control, with its status
    http_status = 503


class FakeRenderer:
    """``BaseRenderer.render_cmpl_async``: a TextPrompt or TokensPrompt in, an EngineInput (with "type") out."""

    default_cmpl_tok_params = SimpleNamespace(max_total_tokens=4096, add_special_tokens=True)

    async def render_cmpl_async(self, prompts: list[dict[str, Any]], tok_params: Any) -> list[dict[str, Any]]:
        assert tok_params is self.default_cmpl_tok_params
        [prompt] = prompts
        ids = prompt.get("prompt_token_ids") or [ord(c) for c in prompt["prompt"]]
        return [{"type": "token", "prompt_token_ids": ids, "arrival_time": 0.0}]


@dataclass
class VllmPoolingParams:  # vLLM's PoolingParams: the task is all gpulb sets
    task: str | None = None


@dataclass
class FakeTensor:
    values: list[float]

    def tolist(self) -> list[float]:
        return list(self.values)


class FakeAsyncLLM:
    """``AsyncLLM``'s surface: from_engine_args(args, stat_loggers), vllm_config, model_config, renderer,
    an async-generator generate that aborts its request when closed (cancelled), check_health, shutdown."""

    instance: FakeAsyncLLM
    with_renderer = True  # False: a vLLM release from before renderers, rendering raw prompts itself
    max_num_seqs: int | None = 128
    max_num_active_seqs: int | None = None
    max_model_len = 4096

    def __init__(self, args: dict[str, Any], stat_loggers: list[Any]) -> None:
        self.args = args
        self.logger = stat_loggers[0](SimpleNamespace(), 0)
        self.logger.log_engine_initialized()
        self.in_flight = self.max_in_flight = 0
        self.seen: list[tuple[str, VllmSamplingParams]] = []
        self.seen_pooling: list[tuple[str, str]] = []
        self.kinds: list[str] = []  # "rendered", "text" or "tokens": what generate() was given
        self.aborted: list[str] = []  # requests whose generator was closed while they ran
        self.abort_calls: list[str] = []
        self.errored = False
        self.loop = asyncio.get_running_loop()  # the engine lives on the backend's loop thread
        self.release = asyncio.Event()
        scheduler = SimpleNamespace(max_num_seqs=self.max_num_seqs, max_num_active_seqs=self.max_num_active_seqs)
        self.model_config = SimpleNamespace(max_model_len=self.max_model_len)
        self.vllm_config = SimpleNamespace(scheduler_config=scheduler, model_config=self.model_config)
        if self.with_renderer:
            self.renderer = FakeRenderer()
        FakeAsyncLLM.instance = self

    @classmethod
    def from_engine_args(cls, args: dict[str, Any], stat_loggers: list[Any]) -> FakeAsyncLLM:
        return cls(args, stat_loggers)

    def release_held(self) -> None:
        """Let the requests holding ``@@hold`` finish (from any thread)."""
        self.loop.call_soon_threadsafe(self.release.set)

    async def generate(self, prompt: Any, params: VllmSamplingParams, request_id: str) -> AsyncIterator[Any]:
        """FINAL_ONLY: one output once done. DELTA: ``delta_outputs``, a held request holding after the first."""
        text = self._text(prompt)
        self.seen.append((text, params))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        streamed = params.output_kind == "DELTA"
        try:
            await self._run(text, hold=not streamed)
            for output in delta_outputs(text, params.max_tokens) if streamed else []:
                yield output
                await self._run(text, hold=True)
        except (asyncio.CancelledError, GeneratorExit):  # as AsyncLLM: a closed generator aborts its request
            self.aborted.append(request_id)
            raise
        finally:
            self.in_flight -= 1
        tokens = params.max_tokens
        self.logger.record(SimpleNamespace(num_running_reqs=self.in_flight, num_waiting_reqs=0, kv_cache_usage=0.25),
                           SimpleNamespace(num_generation_tokens=tokens))  # fmt: skip
        if not streamed:
            yield SimpleNamespace(prompt_token_ids=text.split(), outputs=[completion(f"<{text}>", tokens, "length")])

    async def _run(self, text: str, hold: bool = True) -> None:
        await asyncio.sleep(0.01)
        if hold and HOLD in text:
            await self.release.wait()
        if "@@busy" in text:
            raise QueueOverflowError("The engine is currently busy and cannot accept new requests.")
        if "@@invalid" in text:
            raise VLLMClientError("The decoder prompt cannot be empty")
        if "@@boom" in text:
            raise EngineGenerateError() from KeyError("kv block")
        if "@@dead" in text:
            self.errored = True
            raise EngineDeadError("EngineCore encountered an issue.")

    def _text(self, prompt: dict[str, Any]) -> str:
        """The prompt as text (the fake tokenizer's ids are character codes), noting what form it came in."""
        if "type" in prompt:
            self.kinds.append("rendered")
            return "".join(chr(i) for i in prompt["prompt_token_ids"])
        if "prompt" in prompt:
            self.kinds.append("text")
            return str(prompt["prompt"])
        self.kinds.append("tokens")
        return "".join(chr(i) for i in prompt["prompt_token_ids"])

    def get_tokenizer(self) -> Any:
        async def tokenizer() -> Any:  # a coroutine, as in vLLM releases before 0.11
            return FakeTokenizer()

        return tokenizer()

    async def encode(self, prompt: str, params: VllmPoolingParams, request_id: str) -> AsyncIterator[Any]:
        """A pooling model's one output: ``outputs.data`` a tensor (here: anything with ``tolist``)."""
        self.seen_pooling.append((prompt, params.task))
        await asyncio.sleep(0.01)
        vector = [float(len(prompt)), float(len(prompt.split()))]
        yield SimpleNamespace(prompt_token_ids=prompt.split(), outputs=SimpleNamespace(data=FakeTensor(vector)))

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)  # by its external id: does nothing for a request already ended

    async def check_health(self) -> None:
        if self.errored:
            raise EngineDeadError("EngineCore encountered an issue.")

    def shutdown(self) -> None:
        self.args["shut_down_on"] = threading.current_thread().name


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    class StatLoggerBase:
        pass

    names = ["vllm", "vllm.v1.metrics.loggers", "vllm.v1.engine.async_llm", "vllm.sampling_params", "vllm.exceptions"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["vllm"].SamplingParams = VllmSamplingParams  # type: ignore[attr-defined]
    modules["vllm"].PoolingParams = VllmPoolingParams  # type: ignore[attr-defined]
    modules["vllm"].AsyncEngineArgs = lambda **kw: dict(kw)  # type: ignore[attr-defined]
    modules["vllm.v1.metrics.loggers"].StatLoggerBase = StatLoggerBase  # type: ignore[attr-defined]
    modules["vllm.v1.engine.async_llm"].AsyncLLM = FakeAsyncLLM  # type: ignore[attr-defined]
    modules["vllm.sampling_params"].RequestOutputKind = SimpleNamespace(FINAL_ONLY="FINAL_ONLY", DELTA="DELTA")  # type: ignore[attr-defined]
    modules["vllm.exceptions"].VLLMClientError = VLLMClientError  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("with_renderer", "max_num_seqs", "max_num_active_seqs", "max_model_len"):
        monkeypatch.setattr(FakeAsyncLLM, name, getattr(FakeAsyncLLM, name))  # restored after each test
    yield


@pytest.fixture
def vllm_backend(fake_vllm: None) -> Iterator[VllmBackend]:
    backend = VllmBackend("m")
    backend.start()
    yield backend
    backend.shutdown()


class TestVllmMapping:
    def test_sampling_fields_are_vllms(self) -> None:
        request = BackendRequest("p", 9, dict(SAMPLING))
        kwargs = vllm_sampling_kwargs(request)
        assert kwargs == {**SAMPLING, "max_tokens": 9}
        assert VllmSamplingParams(**kwargs).max_tokens == 9  # every name is one vLLM takes

    def test_final_output_maps_text_tokens_and_reason(self) -> None:
        final = SimpleNamespace(prompt_token_ids=[1, 2, 3, 4], outputs=[completion("Paris.", 3, "stop")])
        assert output_from_vllm(final) == BackendOutput("Paris.", 3, prompt_tokens=4, finish_reason="stop")

    def test_aborted_request_is_a_retryable_failure(self) -> None:
        out = output_from_vllm(SimpleNamespace(prompt_token_ids=[1], outputs=[completion("", 0, "abort")]))
        assert out.error == "vLLM aborted the request" and out.retryable

    def test_deltas_fold_into_what_final_only_gives(self) -> None:
        pieces: list[str] = []
        deltas = DeltaOutputs(pieces.append)
        assert deltas.output() is None
        for output in delta_outputs("a b", 4):
            deltas.add(output)
        assert deltas.output() == BackendOutput("<a b>", 4, prompt_tokens=2, finish_reason="length")
        assert pieces == ["<a ", "b>"]  # the step with tokens but no text is not a piece

    def test_a_stream_vllm_aborted_is_a_retryable_failure(self) -> None:
        deltas = DeltaOutputs(lambda piece: None)
        for output in delta_outputs("@@abort", 3):
            deltas.add(output)
        assert deltas.output() == BackendOutput("", 0, error="vLLM aborted the request", retryable=True)

    def test_stats_follow_the_scheduler_and_count_tokens(self) -> None:
        stats = EngineStats()
        stats.observe(SimpleNamespace(num_running_reqs=5, num_waiting_reqs=2, kv_cache_usage=0.5), None)
        stats.observe(None, SimpleNamespace(num_generation_tokens=40))
        stats.observe(SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1),
                      SimpleNamespace(num_generation_tokens=2))  # fmt: skip
        assert stats.load() == EngineLoad(running=1, waiting=0, kv_cache_usage=0.1, generated_tokens=42)


@pytest.mark.usefixtures("fake_vllm")
class TestVllmBackend:
    def test_micro_batch_runs_concurrently_with_final_only_outputs(self) -> None:
        backend = VllmBackend("org/model", dtype="bfloat16", engine_args={"gpu_memory_utilization": 0.8})
        backend.start()
        engine = FakeAsyncLLM.instance
        assert engine.args == {"model": "org/model", "dtype": "bfloat16", "disable_log_stats": False,
                               "gpu_memory_utilization": 0.8}  # fmt: skip
        requests = [BackendRequest(f"p{i}", 3 + i, {"temperature": 0.0}) for i in range(8)]
        outputs = backend.generate([*requests, BackendRequest(None, 2, messages=CHAT)])
        assert [o.text for o in outputs] == [f"<p{i}>" for i in range(8)] + ["<system=be brief|user=hi>"]
        assert [o.output_tokens for o in outputs] == [3 + i for i in range(8)] + [2]
        assert {p.output_kind for _, p in engine.seen} == {"FINAL_ONLY"}
        assert engine.kinds == ["rendered"] * 9  # never a raw prompt: vLLM deprecates them
        assert engine.max_in_flight == 9
        assert backend.engine_load() == EngineLoad(running=0, waiting=0, kv_cache_usage=0.25,
                                                   generated_tokens=sum(3 + i for i in range(8)) + 2)  # fmt: skip
        assert backend.healthy()
        backend.shutdown()
        assert engine.args["shut_down_on"] == "gpulb-vllm-loop"  # on its own loop: no EngineDeadError logged
        assert not backend.healthy()

    def test_a_parameter_vllm_refuses_fails_only_that_request(self, vllm_backend: VllmBackend) -> None:
        outputs = vllm_backend.generate([BackendRequest("ok", 2), BackendRequest("bad", 2, {"typical_p": 0.5})])
        assert outputs[0].error is None and outputs[0].output_tokens == 2
        assert outputs[1].error is not None and "vLLM refused the request" in outputs[1].error
        assert not outputs[1].retryable

    def test_requests_finish_on_their_own_and_callbacks_run_on_the_engine_loop(self, vllm_backend: VllmBackend) -> None:
        held = vllm_backend.submit(BackendRequest(f"long {HOLD}", 5))
        quick = vllm_backend.submit(BackendRequest("quick", 3))
        assert quick.result(timeout=5).text == "<quick>" and not held.done()
        thread = callback_thread(held)
        FakeAsyncLLM.instance.release_held()
        assert held.result(timeout=5).output_tokens == 5
        assert thread.result(timeout=5) == "gpulb-vllm-loop"

    def test_abort_closes_the_generator_so_vllm_aborts_the_request(self, vllm_backend: VllmBackend) -> None:
        engine = FakeAsyncLLM.instance
        held = [vllm_backend.submit(BackendRequest(f"{HOLD} {i}", 4)) for i in range(3)]
        assert eventually(lambda: engine.in_flight == 3)
        vllm_backend.abort(held[0])
        assert held[0].cancelled()
        assert eventually(lambda: len(engine.aborted) == 1 and engine.in_flight == 2)  # its slot is free
        assert eventually(lambda: engine.abort_calls == engine.aborted)  # and aborted by id, in case
        engine.release_held()
        assert [f.result(timeout=5).output_tokens for f in held[1:]] == [4, 4]
        assert len(engine.aborted) == 1 and len(engine.abort_calls) == 1

    def test_a_streamed_request_feeds_its_deltas_and_ends_as_final_only_would(self, vllm_backend: VllmBackend) -> None:
        pieces: list[tuple[str, str]] = []

        def on_text(piece: str) -> None:
            pieces.append((piece, threading.current_thread().name))

        streamed, final = vllm_backend.generate([BackendRequest("two words", 7, on_text=on_text),
                                                 BackendRequest("two words", 7)])  # fmt: skip
        assert streamed == final == BackendOutput("<two words>", 7, prompt_tokens=2, finish_reason="length")
        assert pieces == [(piece, "gpulb-vllm-loop") for piece in ("<tw", "o w", "ord", "s>")]
        assert sorted(params.output_kind for _, params in FakeAsyncLLM.instance.seen) == ["DELTA", "FINAL_ONLY"]

    def test_a_streamed_chat_streams_too(self, vllm_backend: VllmBackend) -> None:
        pieces: list[str] = []
        [out] = vllm_backend.generate([BackendRequest(None, 5, messages=CHAT, on_text=pieces.append)])
        assert out == BackendOutput("<system=be brief|user=hi>", 5, prompt_tokens=2, finish_reason="length")
        assert "".join(pieces) == out.text and len(pieces) == 9

    def test_abort_mid_stream_aborts_the_request_in_vllm(self, vllm_backend: VllmBackend) -> None:
        engine = FakeAsyncLLM.instance
        pieces: list[str] = []
        held = vllm_backend.submit(BackendRequest(HOLD, 9, on_text=pieces.append))
        assert eventually(lambda: pieces == ["<@@"])
        vllm_backend.abort(held)
        assert held.cancelled()
        assert eventually(lambda: len(engine.aborted) == 1 and engine.in_flight == 0)
        assert eventually(lambda: engine.abort_calls == engine.aborted)
        engine.release_held()
        assert vllm_backend.generate([BackendRequest("after", 2)])[0].text == "<after>"
        assert pieces == ["<@@"]

    def test_a_sink_that_raises_fails_its_request_and_aborts_it_in_vllm(self, vllm_backend: VllmBackend) -> None:
        def broken(piece: str) -> None:
            raise RuntimeError("the reader is gone")

        [out] = vllm_backend.generate([BackendRequest("p", 5, on_text=broken)])
        assert (out.error, out.retryable) == ("vLLM failed the request: RuntimeError: the reader is gone", False)
        assert len(FakeAsyncLLM.instance.aborted) == 1 and FakeAsyncLLM.instance.in_flight == 0

    def test_slots_are_the_schedulers_max_num_seqs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        backend = VllmBackend("m", engine_args={"max_num_seqs": 64})
        assert backend.slots() == 64  # before start: what was asked for
        backend.start()
        assert backend.slots() == 128  # the engine's own config wins
        backend.shutdown()
        monkeypatch.setattr(FakeAsyncLLM, "max_num_active_seqs", 48)  # the admission limit, when set
        backend = VllmBackend("m")
        backend.start()
        assert backend.slots() == 48
        backend.shutdown()
        monkeypatch.setattr(FakeAsyncLLM, "max_num_seqs", None)
        monkeypatch.setattr(FakeAsyncLLM, "max_num_active_seqs", None)
        backend = VllmBackend("m")
        backend.start()
        assert backend.slots() is None
        backend.shutdown()

    def test_max_tokens_above_max_model_len_fails_as_the_server_answers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(FakeAsyncLLM, "max_model_len", 512)
        backend = VllmBackend("m")
        backend.start()
        over, fits = backend.generate([BackendRequest("too many", 600), BackendRequest("fits", 512)])
        assert (over.error, over.retryable, over.output_tokens, over.error_status) == (
            "vLLM refused the request: max_tokens=600 cannot be greater than max_model_len=512. "
            "Please request fewer output tokens.", False, 0, 400,
        )  # fmt: skip
        assert (fits.error, fits.output_tokens) == (None, 512)
        assert [text for text, _ in FakeAsyncLLM.instance.seen] == ["fits"]
        backend.shutdown()

    def test_engine_errors_map_to_busy_refused_failed_or_dead(self, vllm_backend: VllmBackend) -> None:
        busy, invalid, boom = vllm_backend.generate([BackendRequest(m, 2) for m in ("@@busy", "@@invalid", "@@boom")])
        assert busy.retryable and busy.error is not None and busy.error.startswith("vLLM is busy: The engine is")
        assert (invalid.retryable, invalid.error_status, invalid.error) == (
            False, 400, "vLLM refused the request: The decoder prompt cannot be empty",
        )  # fmt: skip
        assert (boom.retryable, boom.error_status, boom.error) == (
            False, None, "vLLM failed the request: EngineGenerateError (from KeyError: 'kv block')",
        )  # fmt: skip
        dead = vllm_backend.submit(BackendRequest("@@dead", 2))
        with pytest.raises(EngineUnavailable, match="vLLM engine died: EngineDeadError"):
            dead.result(timeout=5)
        assert not vllm_backend.healthy()

    def test_a_vllm_without_a_renderer_gets_text_and_token_prompts(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(FakeAsyncLLM, "with_renderer", False)
        backend = VllmBackend("m")
        backend.start()
        outputs = backend.generate([BackendRequest("plain", 2), BackendRequest(None, 2, messages=CHAT)])
        assert [o.text for o in outputs] == ["<plain>", "<system=be brief|user=hi>"]
        assert FakeAsyncLLM.instance.kinds == ["text", "tokens"]
        backend.shutdown()

    def test_shutdown_aborts_what_runs_and_refuses_more(self) -> None:
        backend = VllmBackend("m")
        with pytest.raises(BackendError, match="before start"):
            backend.submit(BackendRequest("early", 1))
        backend.start()
        engine = FakeAsyncLLM.instance
        held = backend.submit(BackendRequest(HOLD, 2))
        assert eventually(lambda: engine.in_flight == 1)
        backend.shutdown()
        assert held.cancelled() and len(engine.aborted) == 1
        assert engine.args["shut_down_on"] == "gpulb-vllm-loop"
        with pytest.raises(BackendError, match="after shutdown"):
            backend.submit(BackendRequest("late", 1))
        backend.shutdown()  # twice is harmless


# -- TensorRT-LLM --------------------------------------------------------------------------------


@dataclass
class TrtSamplingParams:  # tensorrt_llm.SamplingParams field names (a subset: all that we may send)
    max_tokens: int = 32
    stop: str | list[str] | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    ignore_eos: bool = False


class FakeGenerationResult:
    """``tensorrt_llm.executor.result.GenerationResult``'s surface: ``aresult()`` (which, as the real one, works
    only for a result made while an asyncio loop ran), ``abort()``, ``aborted()``, ``finished``, ``request_id``,
    ``prompt_token_ids``, ``outputs``."""

    def __init__(self, llm: FakeTrtLLM, request_id: int, prompt: str, params: TrtSamplingParams) -> None:
        self.llm, self.request_id, self.prompt = llm, request_id, prompt
        self.prompt_token_ids = [0] * len(prompt)
        self.outputs = [completion(prompt.upper(), params.max_tokens, "length")]
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # the real result then has no async queue: aresult() cannot work
        self._done = asyncio.Event() if self._loop else None
        self._aborted = False
        if HOLD not in prompt:
            self.finish()

    @property
    def finished(self) -> bool:
        return self._done is not None and self._done.is_set()

    def finish(self) -> None:
        assert self._loop is not None and self._done is not None
        self._loop.call_soon_threadsafe(self._done.set)

    async def aresult(self) -> FakeGenerationResult:
        assert self._done is not None, "The asyncio event loop was not present during initialization"
        await self._done.wait()
        if "@@boom" in self.prompt:
            raise RuntimeError("executor error")  # tensorrt_llm's RequestError is a RuntimeError
        return self

    def abort(self) -> None:
        self.llm.aborted.append(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted


class FakeTrtLLM:
    """``tensorrt_llm.LLM``'s surface: ``generate_async`` returns a GenerationResult, ``get_stats(timeout)`` a
    list of dicts, ``args`` its LLM args (``max_batch_size``, ``build_config.max_batch_size``)."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model, self.kwargs = model, kwargs
        self.tokenizer = FakeTokenizer()
        self.args = SimpleNamespace(max_batch_size=None, build_config=SimpleNamespace(max_batch_size=None))
        self.stats: list[Any] = []
        self.results: list[FakeGenerationResult] = []
        self.aborted: list[int] = []
        self.closed = False

    def generate_async(self, prompt: str | list[int], params: TrtSamplingParams) -> FakeGenerationResult:
        if isinstance(prompt, list):  # token ids
            prompt = "".join(chr(i) for i in prompt)
        result = FakeGenerationResult(self, len(self.results), prompt, params)
        self.results.append(result)
        return result

    def release_held(self) -> None:
        for result in self.results:
            if not result.finished:
                result.finish()

    def get_stats(self, timeout: float) -> list[Any]:
        stats, self.stats = self.stats, []
        return stats

    def shutdown(self) -> None:
        self.closed = True


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[TensorRTLLMBackend]:
    module = types.ModuleType("tensorrt_llm")
    module.LLM = FakeTrtLLM  # type: ignore[attr-defined]
    module.SamplingParams = TrtSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    backend = TensorRTLLMBackend("/models/llama", engine_args={"tensor_parallel_size": 1})
    backend.start()
    yield backend
    backend.shutdown()


class TestTensorRTLLM:
    def test_sampling_maps_greedy_and_top_k_off(self) -> None:
        kwargs = trtllm_sampling_kwargs(BackendRequest("p", 9, dict(SAMPLING)))
        expected = {**SAMPLING, "max_tokens": 9, "top_k": 1}
        del expected["temperature"]
        assert kwargs == expected
        assert TrtSamplingParams(**kwargs).top_k == 1
        assert "top_k" not in trtllm_sampling_kwargs(BackendRequest("p", 1, {"top_k": -1, "temperature": 0.7}))

    def test_iteration_stats_give_running_waiting_and_kv(self) -> None:
        stats = {"numActiveRequests": 12, "numQueuedRequests": 3, "kvCacheStats": {"maxNumBlocks": 400,
                 "usedNumBlocks": 100, "freeNumBlocks": 300}}  # fmt: skip
        assert load_from_iteration_stats(stats) == EngineLoad(running=12, waiting=3, kv_cache_usage=0.25)
        assert load_from_iteration_stats('{"numActiveRequests": 1}') == EngineLoad(running=1)

    def test_generate_maps_outputs_and_isolates_a_failed_request(self, trt: TensorRTLLMBackend) -> None:
        outputs = trt.generate([BackendRequest("ab", 4), BackendRequest("x @@boom", 4),
                                BackendRequest(None, 2, messages=CHAT)])  # fmt: skip
        assert outputs[0] == BackendOutput("AB", 4, prompt_tokens=2, finish_reason="length")
        assert outputs[1].error == "TensorRT-LLM failed the request: RuntimeError: executor error"
        assert outputs[2].text == "SYSTEM=BE BRIEF|USER=HI" and outputs[2].output_tokens == 2
        assert trt._llm.kwargs == {"dtype": "auto", "enable_iter_perf_stats": True, "tensor_parallel_size": 1}

    def test_a_parameter_the_engine_refuses_fails_only_that_request(self, trt: TensorRTLLMBackend) -> None:
        ok, bad = trt.generate([BackendRequest("ok", 1), BackendRequest("bad", 1, {"typical_p": 0.5})])
        assert ok.error is None
        assert bad.error is not None and bad.error.startswith("TensorRT-LLM refused the request: ")
        assert bad.error_status == 400

    def test_load_uses_the_newest_iteration_then_idles(self, trt: TensorRTLLMBackend) -> None:
        trt.generate([BackendRequest("abc", 5)])
        trt._llm.stats = [{"numActiveRequests": 9, "numQueuedRequests": 1, "kvCacheStats": {}},
                          {"numActiveRequests": 2, "numQueuedRequests": 0, "kvCacheStats": {}}]  # fmt: skip
        assert trt.engine_load() == EngineLoad(running=2, waiting=0, kv_cache_usage=None, generated_tokens=5)
        assert trt.engine_load() == EngineLoad(running=0, waiting=0, kv_cache_usage=None, generated_tokens=5)

    def test_a_running_request_keeps_the_last_load(self, trt: TensorRTLLMBackend) -> None:
        held = trt.submit(BackendRequest(HOLD, 3))
        trt._llm.stats = [{"numActiveRequests": 1, "numQueuedRequests": 0}]
        assert eventually(lambda: trt._llm.results and trt.engine_load().running == 1)
        assert trt.engine_load().running == 1  # no new iteration, but one runs: not idle
        trt._llm.release_held()
        assert held.result(timeout=5).output_tokens == 3
        assert trt.engine_load() == EngineLoad(running=0, waiting=0, generated_tokens=3)

    def test_requests_finish_on_their_own_and_callbacks_run_on_the_loop(self, trt: TensorRTLLMBackend) -> None:
        held = trt.submit(BackendRequest(f"slow {HOLD}", 4))
        quick = trt.submit(BackendRequest("quick", 2))
        assert quick.result(timeout=5).text == "QUICK" and not held.done()
        thread = callback_thread(held)
        trt._llm.release_held()
        assert held.result(timeout=5).output_tokens == 4
        assert thread.result(timeout=5) == "gpulb-trtllm-loop"

    def test_abort_aborts_the_request_in_the_executor(self, trt: TensorRTLLMBackend) -> None:
        held = [trt.submit(BackendRequest(f"{HOLD} {i}", 2)) for i in range(2)]
        assert eventually(lambda: len(trt._llm.results) == 2)
        trt.abort(held[0])
        assert held[0].cancelled()
        assert eventually(lambda: trt._llm.aborted == [0])
        trt._llm.release_held()
        assert held[1].result(timeout=5).output_tokens == 2 and trt._llm.aborted == [0]

    def test_shutdown_aborts_what_runs_and_refuses_more(self, trt: TensorRTLLMBackend) -> None:
        llm = trt._llm
        held = trt.submit(BackendRequest(HOLD, 2))
        assert eventually(lambda: len(llm.results) == 1)
        trt.shutdown()
        assert held.cancelled() and llm.aborted == [0] and llm.closed
        with pytest.raises(BackendError, match="after shutdown"):
            trt.submit(BackendRequest("late", 1))

    def test_slots_from_the_args_the_llm_or_its_stats(self, trt: TensorRTLLMBackend) -> None:
        assert trt.slots() is None  # nothing tells yet
        trt._llm.stats = [{"numActiveRequests": 0, "maxNumActiveRequests": 96}]
        trt.engine_load()
        assert trt.slots() == 96
        trt._llm.args.build_config.max_batch_size = 256
        assert trt.slots() == 256
        trt._llm.args.max_batch_size = 512
        assert trt.slots() == 512
        assert TensorRTLLMBackend("m", engine_args={"max_batch_size": 64}).slots() == 64


def test_a_missing_engine_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(ConfigError, match=r"pip install 'gpulb\[vllm\]'"):
        create_backend(WorkerSettings(model="m", backend=BackendName.VLLM)).start()
    with pytest.raises(ConfigError, match=r"pip install 'gpulb\[tensorrt\]'"):
        create_backend(WorkerSettings(model="m", backend=BackendName.TENSORRT_LLM)).start()


# -- NVML ------------------------------------------------------------------------------------------


class FakeNvml:
    """pynvml's calls; device 1 is a MIG-like slice that reports no utilisation."""

    def nvmlDeviceGetCount(self) -> int:
        return 4

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index >= 4:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return f"idx{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return f"uuid:{uuid}"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        if handle == "idx1":
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=2048 * 1024 * 1024, total=81920 * 1024 * 1024)


class TestNvml:
    def test_visible_device_is_the_first_entry(self) -> None:
        assert visible_device({"CUDA_VISIBLE_DEVICES": "3,1"}) == "3"
        assert visible_device({"CUDA_VISIBLE_DEVICES": "GPU-8f1e,GPU-22"}) == "GPU-8f1e"
        assert visible_device({}) is None

    def test_integer_entries_are_nvml_indices_and_uuids_are_looked_up(self) -> None:
        nvml: Any = FakeNvml()
        assert GpuMonitor(nvml, "2")._handle == "idx2"
        assert GpuMonitor(nvml, "GPU-8f1e")._handle == "uuid:GPU-8f1e"
        assert GpuMonitor(nvml, "MIG-77")._handle == "uuid:MIG-77"

    def test_sample_reads_util_and_memory_and_survives_unsupported_calls(self) -> None:
        nvml: Any = FakeNvml()
        full = GpuMonitor(nvml, "0").sample()
        assert (full.util_percent, full.mem_used_mb, full.mem_total_mb) == (37.0, 2048.0, 81920.0)
        mig = GpuMonitor(nvml, "1").sample()
        assert (mig.util_percent, mig.mem_used_mb) == (None, 2048.0)
        missing = GpuMonitor(nvml, "9")
        assert not missing.available and missing.sample().util_percent is None

    def test_pinning_counts_within_what_the_process_may_see(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES"):  # set, then unset: both restored afterwards
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        assert pin_to_gpu(2) == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # the order NVML and nvidia-smi number GPUs in
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,GPU-5e1f")  # a scheduler's share of the host
        assert pin_to_gpu(1) == "GPU-5e1f" and os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-5e1f"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
        with pytest.raises(ConfigError, match="only 2 GPU"):
            pin_to_gpu(2)
        assert parse_gpu_list("all") == [0, 1]

    def test_gpu_lists(self) -> None:
        assert count_gpus(FakeNvml()) == 4  # type: ignore[arg-type]
        assert parse_gpu_list("all", count=3) == [0, 1, 2]
        assert parse_gpu_list("0, 2,5") == [0, 2, 5]
        for bad in ("0,0", "x", "-1", ""):
            with pytest.raises(ConfigError, match="--gpus"):
                parse_gpu_list(bad)
        with pytest.raises(ConfigError, match="no GPU found"):
            parse_gpu_list("all", count=0)


def test_a_vllm_engine_that_errored_is_dead_for_good() -> None:
    from types import SimpleNamespace

    from worker.backends.vllm_engine import VllmBackend

    backend = VllmBackend("m")
    assert not backend.dead()
    backend._engine = SimpleNamespace(errored=False)
    assert not backend.dead()
    backend._engine = SimpleNamespace(errored=True)
    assert backend.dead()


class TestVllmEmbeddings:
    def test_a_pooling_engine_embeds_each_text_in_order(self, fake_vllm: None) -> None:
        backend = VllmBackend("m", engine_args={"runner": "pooling", "convert": "embed"})
        backend.start()
        try:
            [out] = backend.generate([BackendRequest(None, 1, inputs=["one two", "three"])])
        finally:
            backend.shutdown()
        assert backend.can_embed and out.error is None
        assert (out.embeddings, out.prompt_tokens, out.output_tokens) == ([[7.0, 2.0], [5.0, 1.0]], 3, 0)
        assert sorted(FakeAsyncLLM.instance.seen_pooling) == [("one two", "embed"), ("three", "embed")]

    def test_a_generating_engine_does_not_claim_to_embed(self) -> None:
        assert not VllmBackend("m").can_embed
