"""The real CLI as subprocesses: a balancer, several workers, batches from Python."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from bench.workloads import fluid_bound_s, heavy_tailed_requests
from gpulb import keys
from gpulb.cli.redis_server import free_port
from gpulb.cli.stack import LocalStack, WorkerSpec
from producer import Client

pytestmark = pytest.mark.e2e


def interruptible() -> None:
    """In the child: Ctrl-C's default action, which a shell's background job (the suite run with ``&``) ignores and
    hands on, so that Python installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def gpulb(*args: str, redis_url: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpulb.cli", "--redis-url", redis_url, *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class TestMixedFleet:
    SPEEDS = (4000.0, 4000.0, 8000.0, 16000.0)

    def test_continuous_engines_answer_eos_terminated_requests_once_shared_by_speed(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        """The default simulated engines batch continuously and stop each request at its own end."""
        from worker.backends.batching import LengthModel

        workers = [WorkerSpec(f"g{i}", "m", 4 * s) for i, s in enumerate(self.SPEEDS)]
        prompts = [f"question {i} about gpus" for i in range(2000)]
        with LocalStack(redis_url, workers, tmp_path), Client(redis_url) as client:
            batch = client.submit_batch(prompts, model="m", max_tokens=512)
            results = batch.results(timeout=120)
            status = batch.status()
        assert (status.completed, status.failed, status.running, status.pending) == (2000, 0, 0, 0)
        assert [r.index for r in results] == list(range(2000)) and len({r.request_id for r in results}) == 2000
        lengths = LengthModel()
        for r, prompt in zip(results, prompts, strict=True):
            assert (r.output_tokens, r.finish_reason == "stop") == lengths.output_length(prompt, 512, {})
        tokens = Counter[str]()
        for r in results:
            tokens[r.worker] += r.output_tokens
        assert tokens["g3"] > tokens["g2"] > max(tokens["g0"], tokens["g1"])

    def test_heavy_tailed_batch_complete_correct_and_spread_by_speed(self, redis_url: str, tmp_path: Path) -> None:
        """The linear simulator (a micro-batch takes its tokens over the speed) and the old balancing."""
        workers = [WorkerSpec(f"g{i}", "m", s, backend="simulated-linear") for i, s in enumerate(self.SPEEDS)]
        requests = heavy_tailed_requests(400, seed=11)
        with LocalStack(redis_url, workers, tmp_path), Client(redis_url) as client:
            start = time.time()
            batch = client.submit_batch(requests, model="m")
            results = batch.results(timeout=120)
            makespan = max(r.finished_at for r in results) - start
            status = batch.status()
        assert (status.total, status.completed, status.failed, status.running, status.pending) == (400, 400, 0, 0, 0)
        assert [r.index for r in results] == list(range(400))
        assert len({r.request_id for r in results}) == 400
        for r, req in zip(results, requests, strict=True):
            assert r.error is None and r.output_tokens == req["max_tokens"]
            assert len(r.text.split()) == req["max_tokens"]
        tokens = Counter[str]()
        for r in results:
            tokens[r.worker] += r.output_tokens
        assert set(tokens) == {"g0", "g1", "g2", "g3"}
        assert tokens["g3"] > tokens["g2"] > max(tokens["g0"], tokens["g1"])
        total = sum(int(req["max_tokens"]) for req in requests)  # type: ignore[call-overload]
        # loose on purpose (shared CI machine); bench.pipeline measures the real ratio
        assert makespan < 1.6 * fluid_bound_s(total, self.SPEEDS)

    def test_status_lists_workers_with_their_load(self, redis_url: str, tmp_path: Path) -> None:
        workers = [WorkerSpec("a", "m", 1000), WorkerSpec("b", "n", 2000)]
        with LocalStack(redis_url, workers, tmp_path), Client(redis_url) as client:
            client.submit_batch(["x"] * 3, model="nobody-serves-this")
            table = gpulb("status", redis_url=redis_url)
            as_json = gpulb("status", "--json", redis_url=redis_url)
        assert table.returncode == 0, table.stderr
        assert any(line.split()[:5] == ["a", "m", "simulated", "idle", "0/128"] for line in table.stdout.splitlines())
        data = json.loads(as_json.stdout)
        assert {(w["worker_id"], w["model"], w["capacity"]) for w in data["workers"]} == {
            ("a", "m", 64),
            ("b", "n", 64),
        }
        assert {m["model"]: m["pending_requests"] for m in data["models"]}["nobody-serves-this"] == 3
        (in_flight,) = data["batches"]
        assert (in_flight["model"], in_flight["state"], in_flight["done"], in_flight["total"]) == (
            "nobody-serves-this", "pending", 0, 3,
        )  # fmt: skip
        assert any(line.split()[1:4] == ["nobody-serves-this", "pending", "0/3"] for line in table.stdout.splitlines())

    def test_status_watch_refreshes_and_rq_info_sees_workers_and_queues(self, redis_url: str, tmp_path: Path) -> None:
        with LocalStack(redis_url, [WorkerSpec("gpu-a", "m", 1000)], tmp_path):
            watch = subprocess.Popen(
                [sys.executable, "-m", "gpulb.cli", "--redis-url", redis_url, "status", "--watch", "--json",
                 "--interval", "0.2"], stdout=subprocess.PIPE, text=True, preexec_fn=interruptible,
            )  # fmt: skip
            time.sleep(2.0)
            watch.send_signal(signal.SIGINT)
            out, _ = watch.communicate(timeout=10)
            rq_info = subprocess.run([str(Path(sys.executable).parent / "rq"), "info", "--url", redis_url],
                                     capture_output=True, text=True, timeout=30)  # fmt: skip
        snapshots = [json.loads(line) for line in out.splitlines()]
        assert watch.returncode == 0 and len(snapshots) >= 3
        assert all([w["worker_id"] for w in s["workers"]] == ["gpu-a"] for s in snapshots)
        assert snapshots[-1]["ts"] > snapshots[0]["ts"]
        assert rq_info.returncode == 0, rq_info.stderr
        lines = rq_info.stdout.splitlines()
        assert lines[0].split()[:2] == ["gpu-a", "|"] and "1 queues, 0 jobs total" in lines  # its own queue
        assert any(line.startswith("gpu-a (") and "idle gpu-a" in line for line in lines)  # the RQ worker, by its id


class TestGracefulShutdown:
    def test_sigterm_mid_batch_finishes_hands_back_and_loses_nothing(self, redis_url: str, tmp_path: Path) -> None:
        workers = [WorkerSpec("leaves", "m", 2000, max_batch=8), WorkerSpec("stays", "m", 2000, max_batch=8)]
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        with LocalStack(redis_url, workers, tmp_path) as stack, Client(redis_url) as client:
            batch = client.submit_batch([{"prompt": f"p{i}", "max_tokens": 50} for i in range(160)], model="m")
            deadline = time.monotonic() + 10
            while batch.status().completed < 20 and time.monotonic() < deadline:
                time.sleep(0.05)  # let both workers get going
            stack.procs["leaves"].send_signal(signal.SIGTERM)
            assert stack.procs["leaves"].wait(timeout=15) == 0
            assert not conn.exists(keys.load_key("leaves"))
            assert not conn.sismember(keys.workers_key(), "leaves")
            results = batch.results(timeout=60)
        assert [r.index for r in results] == list(range(160))
        assert all(r.error is None and r.attempts == 1 for r in results)
        assert Counter(r.worker for r in results)["leaves"] > 0
        status = batch.status()
        assert (status.completed, status.failed, status.running) == (160, 0, 0)
        assert conn.hgetall(keys.credit_key("leaves")) == {"batches": "0", "tokens": "0", "requests": "0"}

    def test_balancer_stops_on_sigterm(self, redis_url: str, tmp_path: Path) -> None:
        stack = LocalStack(redis_url, [], tmp_path).start()
        codes = stack.stop(timeout_s=10)
        assert codes == {"balancer": 0}


class TestPolicies:
    @pytest.mark.parametrize("policy", ["round-robin", "prefix-affinity"])
    def test_a_batch_is_answered_under_another_policy(self, policy: str, redis_url: str, tmp_path: Path) -> None:
        workers = [WorkerSpec("a", "m", 20000, max_batch=4), WorkerSpec("b", "m", 20000, max_batch=4)]
        env = {"GPULB_BALANCER__POLICY": policy}
        prompts = [("shared prefix " * 30) + f"q{i}" if i % 2 else f"short {i}" for i in range(60)]
        with LocalStack(redis_url, workers, tmp_path, env=env), Client(redis_url) as client:
            results = client.submit_batch(prompts, model="m", max_tokens=3).results(timeout=60)
            status_out = gpulb("status", redis_url=redis_url).stdout
        assert [r.index for r in results] == list(range(60)) and all(r.error is None for r in results)
        assert {r.worker for r in results} == {"a", "b"}
        assert policy in status_out

    def test_an_unknown_policy_is_refused_with_the_choices(self, redis_url: str) -> None:
        out = gpulb("balancer", "--policy", "fastest", redis_url=redis_url)
        assert out.returncode == 1
        assert "unknown policy 'fastest'; choose one of least-time, prefix-affinity, round-robin" in out.stderr


class TestCommandLine:
    def test_help_teaches_the_environment_variables(self, redis_url: str) -> None:
        out = gpulb("worker", "--help", redis_url=redis_url)
        assert out.returncode == 0
        assert "GPULB_WORKER__TOKENS_PER_S" in out.stdout and "--max-batch" in out.stdout

    def test_worker_without_a_model_is_a_clear_error(self, redis_url: str) -> None:
        out = gpulb("worker", "--id", "w1", redis_url=redis_url)
        assert out.returncode == 1
        assert "worker needs a model: pass --model or set GPULB_WORKER__MODEL" in out.stderr

    def test_unreachable_redis_is_a_clear_error_not_a_hang(self) -> None:
        url = f"redis://:topsecret@127.0.0.1:{free_port()}/0"
        out = gpulb("status", redis_url=url, timeout=20)
        assert out.returncode == 1
        assert "is unreachable" in out.stderr and "topsecret" not in out.stderr + out.stdout
