"""A balancer with a transformers worker (a tiny model from disk, on CPU) and an openai worker (in front
of a local OpenAI-compatible server) answers mixed batches: every request once, with real token counts."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gpulb import keys
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client
from tests.fake_openai_server import FakeOpenAIServer
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer("tiny", api_key="sk-test-secret", delay_s=0.01) as s:
        yield s


class TestMixedBackends:
    def test_transformers_and_openai_workers_answer_one_batch(
        self, redis_url: str, conn: redis.Redis, tmp_path: Path, model_dir: Path, server: FakeOpenAIServer
    ) -> None:
        workers = [
            WorkerSpec("hf", "tiny", backend="transformers", max_batch=8, args=("--model-path", str(model_dir))),
            WorkerSpec("api", "tiny", backend="openai", max_batch=8,
                       args=("--base-url", server.url, "--api-key", "sk-test-secret")),
        ]  # fmt: skip
        requests = [{"prompt": f"tell me about gpu {i}", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
                    for i in range(40)]  # fmt: skip
        requests += [{"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3, "temperature": 0,
                      "ignore_eos": True} for i in range(20)]  # fmt: skip
        with LocalStack(redis_url, workers, tmp_path / "logs"), Client(redis_url) as client:
            results = client.submit_batch(requests, model="tiny").results(timeout=120)
            time.sleep(1.5)  # a heartbeat: the load keys carry what the engines report
            loads = {w: conn.hgetall(keys.load_key(w)) for w in ("hf", "api")}
        assert [r.index for r in results] == list(range(60))
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        by_worker = Counter(r.worker for r in results)
        assert set(by_worker) == {"hf", "api"} and sum(by_worker.values()) == 60
        for r, req in zip(results, requests, strict=True):
            assert r.output_tokens == req["max_tokens"] and r.finish_reason == "length"
            assert r.prompt_tokens > 0
        served = server.completion_bodies()
        assert len(served) == by_worker["api"]  # each request of the api worker reached the server once
        assert {b["model"] for b in served} == {"tiny"}
        assert loads["api"]["backend"] == "openai" and int(loads["api"]["generated_tokens"]) == server.generation_tokens
        assert loads["hf"]["backend"] == "transformers"
        assert int(loads["hf"]["generated_tokens"]) == sum(r.output_tokens for r in results if r.worker == "hf")
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        assert "sk-test-secret" not in logs and "micro-batch done" in logs
        assert json.loads(next(line for line in logs.splitlines() if "worker registered" in line))["backend"]
        summary = json.loads(next(line for line in logs.splitlines() if '"micro-batch done"' in line))
        assert summary["microbatch_id"].startswith("mb-") and summary["worker_id"] in ("hf", "api")  # ids bound
        assert {"requests", "recorded", "failed", "tokens", "elapsed_s", "level", "timestamp"} <= summary.keys()
