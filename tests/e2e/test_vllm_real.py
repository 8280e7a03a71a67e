"""The real vLLM engine (its CPU build) behind gpulb, end to end through Redis with real processes.

A ``--backend vllm`` worker (``AsyncLLM`` in the worker process) and a ``--backend openai`` worker in front
of vLLM's own OpenAI server each answer a mixed batch of prompt and chat requests built on
``tests.vllm_model``'s random Llama. Every request must come back once, in order, with the engine's token
counts, and the worker's load key must carry what the engine reported. Six of them are streamed: their text
must reach Redis in pieces, as the engine makes it, that join to the result's text.

Each engine start costs ~20-40 s and ~3 GiB on a 2-core machine, so there are two: one per test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gpulb import keys
from gpulb.cli.redis_server import free_port
from gpulb.cli.stack import LocalStack, WorkerSpec
from gpulb.models import Result
from producer import Client
from tests.vllm_model import build_vllm_model

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB; the default takes a large share of the machine's memory
ENGINE_START_S = 300.0
RESULTS_TIMEOUT_S = 300.0
LOAD_SAMPLE_S = 0.1


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kept in pytest's cache directory between runs (the build is skipped when nothing changed), if there is one."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    return build_vllm_model(tmp_path_factory.mktemp("vllm-model") if cache is None else cache.mkdir("gpulb-vllm-model"))


def mixed_requests() -> list[dict[str, Any]]:
    """40 prompts and 10 chats; half of each with ``ignore_eos`` (exactly ``max_tokens``), the others free to
    stop at EOS. Greedy and sampled; prompts of varied lengths. Four prompts and two chats are streamed, all
    of them ``max_tokens`` long (8 to 37 tokens).

    No ``seed``: in vllm-cpu 0.32.0 a seeded request whose prefill is split over two steps (chunked prefill,
    2,048 tokens a step) kills the engine (``RuntimeError: CPU Generator does not use offset``)."""
    requests: list[dict[str, Any]] = []
    for i in range(40):
        requests.append({"prompt": f"request {i}: tell me about the gpu " + "and the load balancer " * (i % 9),
                         "max_tokens": 8 + (i * 7) % 41, "ignore_eos": i % 2 == 0,
                         "temperature": 0.0 if i % 4 < 2 else 1.0, "stream": i % 10 == 0})  # fmt: skip
    for i in range(10):
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i} " * (1 + i)}]
        requests.append({"messages": messages, "max_tokens": 6 + 3 * i, "ignore_eos": i % 2 == 1,
                         "temperature": 0.0 if i < 5 else 0.8, "stream": i % 6 == 1})  # fmt: skip
    return requests


class LoadSampler:
    """Reads a worker's load key ~10 times a second in a thread, keeping the largest ``engine_running`` seen."""

    def __init__(self, conn: redis.Redis, worker_id: str) -> None:
        self.conn, self.worker_id = conn, worker_id
        self.max_engine_running = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(LOAD_SAMPLE_S):
            value = self.conn.hget(keys.load_key(self.worker_id), "engine_running")
            if value is not None:
                self.max_engine_running = max(self.max_engine_running, int(value))  # type: ignore[arg-type]

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_batch(
    redis_url: str, conn: redis.Redis, worker: WorkerSpec, log_dir: Path, requests: list[dict[str, Any]]
) -> tuple[list[Result], dict[str, str], int, dict[str, int | None]]:
    """Start a balancer and ``worker``, answer ``requests`` and check the streamed ones' pieces; return the
    results, the worker's load key once it counts every generated token, the largest ``engine_running`` seen
    meanwhile, and the processes' exit codes."""
    stack = LocalStack(redis_url, [worker], log_dir, env=ENGINE_ENV)
    try:
        stack.start(timeout_s=ENGINE_START_S)
        with Client(redis_url) as client, LoadSampler(conn, worker.id) as sampler:
            batch = client.submit_batch(requests, model=MODEL)
            results = batch.results(timeout=RESULTS_TIMEOUT_S)
        for r in (r for r, req in zip(results, requests, strict=True) if req["stream"]):
            check_streamed(conn, batch.id, r)
        generated = sum(r.output_tokens for r in results)
        load = wait_for_load(conn, worker.id, lambda h: int(h.get("generated_tokens", -1)) >= generated)
    finally:
        codes = stack.stop(timeout_s=60)
    return results, load, sampler.max_engine_running, codes


def check_streamed(conn: redis.Redis, batch_id: str, result: Result) -> None:
    """The request's pieces in Redis (its worker writes them from a queue: the last may follow the result) join
    to its text, from one run, in more than one piece (a piece holds one token or more)."""
    key = keys.text_stream_key(batch_id, result.index)
    deadline = time.monotonic() + 10.0
    while True:
        entries: list[tuple[str, dict[str, str]]] = conn.xrange(key)  # type: ignore[assignment]
        if "".join(fields["t"] for _, fields in entries) == result.text or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    pieces = [fields["t"] for _, fields in entries]
    assert ("".join(pieces), len({fields["r"] for _, fields in entries})) == (result.text, 1), entries
    assert 1 < len(pieces) <= result.output_tokens, pieces


def wait_for_load(
    conn: redis.Redis, worker_id: str, done: Callable[[dict[str, str]], bool], timeout_s: float = 10.0
) -> dict[str, str]:
    """The worker's load key once ``done(it)`` holds (heartbeats come every second), or as it is at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        load: dict[str, str] = conn.hgetall(keys.load_key(worker_id))  # type: ignore[assignment]
        if done(load) or time.monotonic() > deadline:
            return load
        time.sleep(0.2)


def prompt_token_counts(model_dir: Path, requests: list[dict[str, Any]]) -> list[int]:
    """What the engine should count for each prompt: the tokenizer's ids with its BOS, or the chat template's
    text (which starts with BOS) tokenized without adding another."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = []
    for req in requests:
        if "messages" in req:
            text = tokenizer.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True)
            counts.append(len(tokenizer.encode(text, add_special_tokens=False)))
        else:
            counts.append(len(tokenizer.encode(req["prompt"])))
    return counts


def check_results(results: list[Result], requests: list[dict[str, Any]], worker_id: str, model_dir: Path) -> None:
    assert [r.index for r in results] == list(range(len(requests)))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert {r.worker for r in results} == {worker_id}
    for r, req in zip(results, requests, strict=True):
        where = f"request {r.index} ({req.get('temperature')=}, {req.get('ignore_eos')=}): {r}"
        assert 0 < r.output_tokens <= req["max_tokens"], where
        assert r.finish_reason in ("stop", "length"), where
        if req["ignore_eos"] or req["temperature"] == 0.0:  # greedy: the model's EOS logit is never the largest
            assert r.output_tokens == req["max_tokens"] and r.finish_reason == "length", where
    assert [r.prompt_tokens for r in results] == prompt_token_counts(model_dir, requests)


def check_load(load: dict[str, str], backend: str, results: list[Result], max_running: int) -> None:
    assert load["backend"] == backend
    assert int(load["generated_tokens"]) == sum(r.output_tokens for r in results), load
    assert int(load["engine_running"]) == 0, load  # the batch is over
    assert max_running >= 1, "the load key never showed the engine running a request"


class TestVllmWorker:
    def test_answers_a_mixed_batch_through_asyncllm(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path, model_dir: Path
    ) -> None:
        worker = WorkerSpec("vllm0", MODEL, backend="vllm", args=(
            "--model-path", str(model_dir), "--dtype", "float32",
            "--engine-args", f'{{"max_model_len": {MAX_MODEL_LEN}, "enforce_eager": true}}',
        ))  # fmt: skip
        requests = mixed_requests()
        results, load, max_running, codes = run_batch(redis_url, conn, worker, tmp_path / "logs", requests)
        check_results(results, requests, "vllm0", model_dir)
        check_load(load, "vllm", results, max_running)
        assert codes["vllm0"] == 0, f"the worker did not stop cleanly: {codes}"


@pytest.fixture(scope="module")
def vllm_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI server on a free port, serving the model as ``MODEL``; yields its URL once /health answers.

    ``vllm serve`` cannot start in the vllm-cpu build (it looks for the distribution ``vllm``); the module
    entry point can.
    """
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENGINE_ENV})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + ENGINE_START_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the vLLM server did not come up (exit code {proc.poll()}):\n{tail}")
        time.sleep(0.5)


def server_counter(url: str, name: str) -> float:
    """The sum of a metric's samples on the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    samples = (line for line in text.splitlines() if line.startswith((f"{name}{{", f"{name} ")))
    return sum(float(line.rsplit(" ", 1)[1]) for line in samples)


class TestOpenAIWorkerOnVllmServer:
    def test_answers_a_mixed_batch_through_the_http_server(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path, model_dir: Path, vllm_server: str
    ) -> None:
        worker = WorkerSpec("api0", MODEL, backend="openai", args=("--base-url", vllm_server))
        requests = mixed_requests()
        results, load, max_running, codes = run_batch(redis_url, conn, worker, tmp_path / "logs", requests)
        check_results(results, requests, "api0", model_dir)
        check_load(load, "openai", results, max_running)
        assert int(load["generated_tokens"]) == server_counter(vllm_server, "vllm:generation_tokens_total")
        assert codes["api0"] == 0, f"the worker did not stop cleanly: {codes}"


class TestVllmPoolingWorker:
    def test_a_pooling_engine_embeds_through_the_fleet(self, redis_url: str, tmp_path: Path, model_dir: Path) -> None:
        """The same random Llama run by vLLM as an embedding model (runner pooling, convert embed)."""
        engine_args = {"max_model_len": MAX_MODEL_LEN, "enforce_eager": True, "runner": "pooling", "convert": "embed"}
        worker = WorkerSpec("pool0", "tiny-embed", backend="vllm", args=(
            "--model-path", str(model_dir), "--dtype", "float32", "--engine-args", json.dumps(engine_args),
        ))  # fmt: skip
        texts = ["the gpu and the load balancer", "hello", "the gpu and the load balancer"]
        requests: list[dict[str, Any] | str] = [{"input": texts}, {"input": ["hello"]}, "not an embedding"]
        stack = LocalStack(redis_url, [worker], tmp_path / "logs", env=ENGINE_ENV)
        try:
            stack.start(timeout_s=ENGINE_START_S)
            with Client(redis_url) as client:
                batch = client.submit_batch(requests, model="tiny-embed")
                embedded, again, generated = batch.results(timeout=RESULTS_TIMEOUT_S)
        finally:
            codes = stack.stop(timeout_s=60)
        assert codes["pool0"] == 0, f"the worker did not stop cleanly: {codes}"
        assert embedded.error is None and embedded.embeddings is not None and len(embedded.embeddings) == 3
        first, second, third = embedded.embeddings
        assert len(first) == 256 and abs(sum(x * x for x in first) - 1) < 1e-4  # the hidden size, normalised
        assert first == third and first != second
        assert again.embeddings is not None and all(
            abs(a - b) < 1e-5 for a, b in zip(again.embeddings[0], second, strict=True)
        )
        assert embedded.prompt_tokens > len(texts) and embedded.output_tokens == 0
        assert generated.error is not None  # a pooling model does not generate: that request fails, the others stand
