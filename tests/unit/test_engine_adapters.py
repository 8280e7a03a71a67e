"""The vLLM and TensorRT-LLM adapters' mapping of params and outputs, NVML's device mapping.

The engines need a GPU, so here they are replaced by stand-ins with the engines' own signatures
(``SamplingParams`` with exactly vLLM's / TensorRT-LLM's field names, ``AsyncLLM.generate`` as an
async generator, ``generate_async`` returning a future): a name we send that the engine does not
take fails these tests. The adapters run on the real engines on a GPU (see the README).
"""

from __future__ import annotations

import asyncio
import os
import sys
import types
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from gpulb.errors import ConfigError
from gpulb.settings import BackendName, WorkerSettings
from worker.backends import create_backend
from worker.backends.base import BackendOutput, BackendRequest, EngineLoad
from worker.backends.trtllm import TensorRTLLMBackend, load_from_iteration_stats, trtllm_sampling_kwargs
from worker.backends.vllm_engine import EngineStats, VllmBackend, output_from_vllm, vllm_sampling_kwargs
from worker.gpu import GpuMonitor, count_gpus, parse_gpu_list, pin_to_gpu, visible_device

SAMPLING = {"temperature": 0.0, "top_p": 0.9, "top_k": -1, "seed": 7, "stop": ["\n"], "min_tokens": 2,
            "presence_penalty": 0.5, "frequency_penalty": 0.1, "repetition_penalty": 1.1, "min_p": 0.05,
            "ignore_eos": False}  # fmt: skip
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def completion(text: str, tokens: int, reason: str | None = "stop") -> SimpleNamespace:
    return SimpleNamespace(index=0, text=text, token_ids=list(range(tokens)), finish_reason=reason)


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


class FakeAsyncLLM:
    """``AsyncLLM``'s surface: from_engine_args(args, stat_loggers), async-generator generate, check_health."""

    instance: FakeAsyncLLM

    def __init__(self, args: dict[str, Any], stat_loggers: list[Any]) -> None:
        self.args = args
        self.logger = stat_loggers[0](SimpleNamespace(), 0)
        self.logger.log_engine_initialized()
        self.in_flight = self.max_in_flight = 0
        self.seen: list[tuple[str, VllmSamplingParams]] = []
        self.loop_running = asyncio.get_running_loop() is not None
        FakeAsyncLLM.instance = self

    @classmethod
    def from_engine_args(cls, args: dict[str, Any], stat_loggers: list[Any]) -> FakeAsyncLLM:
        return cls(args, stat_loggers)

    async def generate(self, prompt: Any, params: VllmSamplingParams, request_id: str) -> AsyncIterator[Any]:
        if isinstance(prompt, dict):  # a TokensPrompt: our fake tokenizer's ids are character codes
            prompt = "".join(chr(i) for i in prompt["prompt_token_ids"])
        self.seen.append((prompt, params))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        tokens = params.max_tokens
        self.logger.record(SimpleNamespace(num_running_reqs=self.in_flight, num_waiting_reqs=0, kv_cache_usage=0.25),
                           SimpleNamespace(num_generation_tokens=tokens))  # fmt: skip
        yield SimpleNamespace(prompt_token_ids=prompt.split(), outputs=[completion(f"<{prompt}>", tokens, "length")])

    def get_tokenizer(self) -> Any:
        async def tokenizer() -> Any:  # a coroutine, as in vLLM releases before 0.11
            return FakeTokenizer()

        return tokenizer()

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.args["shut_down"] = True


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    class StatLoggerBase:
        pass

    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.v1.metrics.loggers": types.ModuleType("vllm.v1.metrics.loggers"),
        "vllm.v1.engine.async_llm": types.ModuleType("vllm.v1.engine.async_llm"),
        "vllm.sampling_params": types.ModuleType("vllm.sampling_params"),
    }
    modules["vllm"].SamplingParams = VllmSamplingParams  # type: ignore[attr-defined]
    modules["vllm"].AsyncEngineArgs = lambda **kw: dict(kw)  # type: ignore[attr-defined]
    modules["vllm.v1.metrics.loggers"].StatLoggerBase = StatLoggerBase  # type: ignore[attr-defined]
    modules["vllm.v1.engine.async_llm"].AsyncLLM = FakeAsyncLLM  # type: ignore[attr-defined]
    modules["vllm.sampling_params"].RequestOutputKind = SimpleNamespace(FINAL_ONLY="FINAL_ONLY")  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield


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
        assert engine.max_in_flight == 9
        assert backend.engine_load() == EngineLoad(running=0, waiting=0, kv_cache_usage=0.25,
                                                   generated_tokens=sum(3 + i for i in range(8)) + 2)  # fmt: skip
        assert backend.healthy()
        backend.shutdown()
        assert engine.args["shut_down"] is True

    def test_a_parameter_vllm_refuses_fails_only_that_request(self) -> None:
        backend = VllmBackend("m")
        backend.start()
        outputs = backend.generate([BackendRequest("ok", 2), BackendRequest("bad", 2, {"typical_p": 0.5})])
        assert outputs[0].error is None and outputs[0].output_tokens == 2
        assert outputs[1].error is not None and "vLLM refused the request" in outputs[1].error
        assert not outputs[1].retryable
        backend.shutdown()


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


class FakeTrtLLM:
    """``tensorrt_llm.LLM``'s surface: generate_async returns a future, get_stats(timeout) a list of dicts."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model, self.kwargs = model, kwargs
        self.tokenizer = FakeTokenizer()
        self.stats: list[Any] = []
        self.closed = False

    def generate_async(self, prompt: str | list[int], params: TrtSamplingParams) -> Future[Any]:
        future: Future[Any] = Future()
        if isinstance(prompt, list):  # token ids
            prompt = "".join(chr(i) for i in prompt)
        if "@@boom" in prompt:
            future.set_exception(RuntimeError("executor error"))
        else:
            out = completion(prompt.upper(), params.max_tokens, "length")
            future.set_result(SimpleNamespace(prompt_token_ids=[0] * len(prompt), outputs=[out]))
        return future

    def get_stats(self, timeout: float) -> list[Any]:
        stats, self.stats = self.stats, []
        return stats

    def shutdown(self) -> None:
        self.closed = True


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> TensorRTLLMBackend:
    module = types.ModuleType("tensorrt_llm")
    module.LLM = FakeTrtLLM  # type: ignore[attr-defined]
    module.SamplingParams = TrtSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    backend = TensorRTLLMBackend("/models/llama", engine_args={"tensor_parallel_size": 1})
    backend.start()
    return backend


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

    def test_load_uses_the_newest_iteration_then_idles(self, trt: TensorRTLLMBackend) -> None:
        trt.generate([BackendRequest("abc", 5)])
        trt._llm.stats = [{"numActiveRequests": 9, "numQueuedRequests": 1, "kvCacheStats": {}},
                          {"numActiveRequests": 2, "numQueuedRequests": 0, "kvCacheStats": {}}]  # fmt: skip
        assert trt.engine_load() == EngineLoad(running=2, waiting=0, kv_cache_usage=None, generated_tokens=5)
        assert trt.engine_load() == EngineLoad(running=0, waiting=0, kv_cache_usage=None, generated_tokens=5)
        trt.shutdown()


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
