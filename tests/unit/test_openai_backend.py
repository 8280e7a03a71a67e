"""The openai backend against a real local HTTP server that answers as ``vllm serve`` does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from gpulb.errors import BackendError, ConfigError
from gpulb.settings import BackendName, WorkerSettings
from tests.fake_openai_server import FakeOpenAIServer, fake_embedding
from worker.backends.base import BackendOutput, BackendRequest, EngineLoad, TextSink
from worker.backends.openai_server import (
    OpenAIServerBackend,
    StreamedCompletion,
    error_message,
    parse_completion,
    parse_engine_metrics,
    server_root,
)
from worker.execution import ExecutionPolicy, IsolatingExecutor

MODEL = "org/fake-7b"
SECRET = "sk-test-5ecret-d0-not-leak"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(MODEL) as fake:
        yield fake


def make_backend(url: str, **kwargs: object) -> OpenAIServerBackend:
    options: dict[str, object] = {"request_timeout_s": 5.0, "startup_timeout_s": 5.0, **kwargs}
    return OpenAIServerBackend(url, MODEL, **options)  # type: ignore[arg-type]


@pytest.fixture
def backend(server: FakeOpenAIServer) -> Iterator[OpenAIServerBackend]:
    b = make_backend(server.url)
    yield b
    b.shutdown()


def prompt(text: str, max_tokens: int = 4, on_text: TextSink | None = None, **sampling: object) -> BackendRequest:
    return BackendRequest(prompt=text, max_tokens=max_tokens, sampling=dict(sampling), on_text=on_text)


def chat(content: str, max_tokens: int = 4, on_text: TextSink | None = None) -> BackendRequest:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    return BackendRequest(prompt=None, max_tokens=max_tokens, messages=messages, on_text=on_text)


def sse(*chunks: object) -> list[str]:
    """The lines of a stream of ``chunks`` (``[DONE]`` as it is), as ``aiter_lines`` gives them."""
    return [line for chunk in chunks for line in (f"data: {chunk if chunk == '[DONE]' else json.dumps(chunk)}", "")]


def folded(lines: list[str], pieces: list[str] | None = None) -> BackendOutput:
    events = StreamedCompletion("/v1/completions", (pieces if pieces is not None else []).append)
    for line in lines:
        events.feed(line)
    return events.output()


def executor(backend: OpenAIServerBackend) -> IsolatingExecutor:
    return IsolatingExecutor(backend, ExecutionPolicy(max_attempts=3, retry_backoff_s=0.01), threading.Event())


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TestGenerate:
    def test_completion_maps_text_tokens_and_finish_reason(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        [out] = backend.generate([prompt("alpha beta gamma", 5, temperature=0.5, top_k=20, seed=7, ignore_eos=True)])
        assert (out.text, out.output_tokens, out.prompt_tokens, out.finish_reason) == (
            "alpha beta gamma alpha beta", 5, 3, "length",
        )  # fmt: skip
        assert (out.error, out.retryable) == (None, False)
        [body] = server.completion_bodies()
        assert body == {"model": MODEL, "max_tokens": 5, "prompt": "alpha beta gamma", "temperature": 0.5,
                        "top_k": 20, "seed": 7, "ignore_eos": True}  # fmt: skip
        assert server.paths() == ["/v1/completions"]

    def test_chat_goes_to_chat_completions(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        [out] = backend.generate([chat("hello there", 3)])
        assert (out.text, out.output_tokens, out.prompt_tokens, out.finish_reason) == (
            "be brief hello", 3, 4, "length",
        )  # fmt: skip
        [body] = server.completion_bodies()
        assert body == {"model": MODEL, "max_tokens": 3, "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]}  # fmt: skip
        assert server.paths() == ["/v1/chat/completions"]

    def test_stop_string_gives_finish_reason_stop(self, backend: OpenAIServerBackend) -> None:
        [out] = backend.generate([prompt("one two three four", 8, stop=["three"])])
        assert (out.text, out.output_tokens, out.finish_reason) == ("one two", 2, "stop")

    def test_sampling_cannot_override_model_or_budget(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        sampling = {"model": "other", "max_tokens": 99, "prompt": "other", "top_p": 0.9}
        backend.generate([BackendRequest(prompt="a", max_tokens=2, sampling=sampling)])
        [body] = server.completion_bodies()
        assert body == {"model": MODEL, "max_tokens": 2, "prompt": "a", "top_p": 0.9}

    def test_outputs_keep_request_order(self, backend: OpenAIServerBackend) -> None:
        requests = [prompt(f"word{i}", 1) if i % 2 else chat(f"word{i}", 3) for i in range(10)]
        outputs = backend.generate(requests)
        assert [o.text for o in outputs] == [f"word{i}" if i % 2 else f"be brief word{i}" for i in range(10)]

    def test_batch_is_sent_concurrently(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        server.delay_s = 0.05
        started = time.monotonic()
        outputs = backend.generate([prompt(f"p{i}", 2) for i in range(32)])
        elapsed = time.monotonic() - started
        assert [o.text for o in outputs] == [f"p{i} p{i}" for i in range(32)]
        assert server.max_in_flight > 1
        assert elapsed < 32 * 0.05 / 2

    def test_base_url_may_end_in_v1(self, server: FakeOpenAIServer) -> None:
        for url in (f"{server.url}/v1", f"{server.url}/v1/", f"{server.url}/"):
            b = make_backend(url)
            assert b.base_url == server.url
            assert b.generate([prompt("x", 1)])[0].text == "x"
            b.shutdown()

    def test_server_root_rejects_non_http(self) -> None:
        assert server_root(" https://h:8000/v1/ ") == "https://h:8000"
        with pytest.raises(ConfigError, match="http"):
            server_root("localhost:8000")


class TestErrors:
    def test_503_is_retryable_then_succeeds_through_the_executor(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        server.fail_next(1)
        [out] = backend.generate([prompt("a b", 2)])
        assert (out.retryable, out.text) == (True, "")
        assert out.error is not None and out.error.startswith("HTTP 503 from /v1/completions: Service unavailable")
        server.fail_next(1)
        [outcome] = executor(backend).run([prompt("a b", 2)], tokens_per_s=1e6)
        assert (outcome.output.text, outcome.output.error, outcome.tries) == ("a b", None, 2)

    @pytest.mark.parametrize("status", [429, 502, 504])
    def test_overload_statuses_are_retryable(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend, status: int
    ) -> None:
        server.fail_next(1, status)
        [out] = backend.generate([prompt("a", 1)])
        assert out.retryable and out.error is not None and out.error.startswith(f"HTTP {status} ")

    def test_500_is_not_retryable(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        server.fail_next(1, 500)
        [out] = backend.generate([prompt("a", 1)])
        assert (out.retryable, out.error) == (
            False,
            "HTTP 500 from /v1/completions: Service unavailable (injected 500)",
        )

    def test_dropped_connection_is_retryable_then_succeeds(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        server.drop_next(1)
        [out] = backend.generate([prompt("a", 1)])
        assert out.retryable and out.error is not None and "RemoteProtocolError" in out.error
        server.drop_next(1)
        [outcome] = executor(backend).run([prompt("c d", 3)], tokens_per_s=1e6)
        assert (outcome.output.text, outcome.tries) == ("c d c", 2)

    def test_refused_connection_is_retryable(self) -> None:
        b = make_backend(f"http://127.0.0.1:{free_port()}")
        [out] = b.generate([prompt("a", 1)])
        assert out.retryable and out.error is not None and "ConnectError" in out.error
        b.shutdown()

    def test_read_timeout_is_retryable(self, server: FakeOpenAIServer) -> None:
        server.delay_s = 0.5
        b = make_backend(server.url, request_timeout_s=0.1)
        [out] = b.generate([prompt("a", 1)])
        assert out.retryable and out.error is not None and "ReadTimeout" in out.error
        b.shutdown()

    def test_400_fails_only_its_request_with_the_servers_message(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        server.reject_containing("TOO-LONG", "This model's maximum context length is 4096 tokens.")
        outputs = backend.generate([prompt("ok one", 2), prompt("TOO-LONG here", 2), chat("ok two", 2)])
        assert [(o.text, o.error) for o in (outputs[0], outputs[2])] == [("ok one", None), ("be brief", None)]
        bad = outputs[1]
        assert (bad.retryable, bad.error_status, bad.error) == (
            False, 400, "HTTP 400 from /v1/completions: This model's maximum context length is 4096 tokens.",
        )  # fmt: skip
        [outcome] = executor(backend).run([prompt("TOO-LONG", 1)], tokens_per_s=1e6)
        assert outcome.tries == 1 and outcome.output.error is not None

    def test_long_server_messages_are_truncated(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        server.reject_containing("X", "y" * 5000)
        [out] = backend.generate([prompt("X", 1)])
        assert out.error is not None and out.error.endswith("y...")
        assert len(out.error) == len("HTTP 400 from /v1/completions: ") + 300

    def test_unknown_model_is_not_retryable(self, server: FakeOpenAIServer) -> None:
        b = OpenAIServerBackend(server.url, "no-such-model")
        [out] = b.generate([prompt("a", 1)])
        assert (out.retryable, out.error) == (
            False,
            "HTTP 404 from /v1/completions: The model `no-such-model` does not exist.",
        )
        b.shutdown()

    def test_malformed_bodies_fail_without_retry(self) -> None:
        payloads: list[object] = [{"choices": []}, {"object": "error"}, {"choices": [{"text": 3}]}, [1, 2]]
        for payload in payloads:
            out = parse_completion(httpx.Response(200, json=payload))
            assert (out.retryable, out.error is not None) == (False, True)
            assert out.error is not None and out.error.startswith("malformed response from the engine server")
        out = parse_completion(httpx.Response(200, text="<html>oops</html>"))
        assert out.error is not None and "<html>oops</html>" in out.error

    def test_chat_without_content_or_usage_is_empty_not_failed(self) -> None:
        message = {"role": "assistant", "content": None}
        payload = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        out = parse_completion(httpx.Response(200, json=payload))
        got = (out.text, out.output_tokens, out.prompt_tokens, out.finish_reason, out.error)
        assert got == ("", 0, 0, "stop", None)

    def test_error_message_reads_every_known_shape(self) -> None:
        shapes = [
            ({"error": {"message": "new vllm", "code": 400}}, "new vllm"),
            ({"object": "error", "message": "old vllm", "code": 400}, "old vllm"),
            ({"error": "Unauthorized"}, "Unauthorized"),
            ({"detail": "Not Found"}, "Not Found"),
        ]
        for payload, expected in shapes:
            assert error_message(httpx.Response(400, json=payload)) == expected
        assert error_message(httpx.Response(502, text="bad gateway")) == "bad gateway"
        assert error_message(httpx.Response(503)) == "Service Unavailable"


class TestSecrets:
    def test_bearer_token_is_sent_and_required(self) -> None:
        with FakeOpenAIServer(MODEL, api_key=SECRET) as fake:
            keyed = make_backend(fake.url, api_key=SECRET)
            assert keyed.generate([prompt("a", 1)])[0].text == "a"
            assert fake.requests[-1].headers["Authorization"] == f"Bearer {SECRET}"
            keyless = make_backend(fake.url)
            [out] = keyless.generate([prompt("a", 1)])
            assert (out.error, out.retryable) == ("HTTP 401 from /v1/completions: Unauthorized", False)
            keyed.shutdown()
            keyless.shutdown()

    def test_the_key_never_shows(self) -> None:
        url = f"http://127.0.0.1:{free_port()}/v1"
        settings = WorkerSettings(backend=BackendName.OPENAI, model=MODEL, base_url=url, api_key=SecretStr(SECRET),
                                  startup_timeout_s=0.2)  # fmt: skip
        b = OpenAIServerBackend.from_settings(settings)
        texts = [repr(b), str(b)]
        with capture_logs() as logs, pytest.raises(BackendError) as excinfo:
            b.start()
        texts += [str(excinfo.value), repr(excinfo.value), repr(logs)]
        texts += [o.error or "" for o in b.generate([prompt("a", 1), chat("b", 1)])]
        texts += [repr(b.engine_load()), repr(b.__dict__)]
        b.shutdown()
        assert not [t for t in texts if SECRET in t]


class TestSettings:
    def test_from_settings(self, server: FakeOpenAIServer) -> None:
        settings = WorkerSettings(backend=BackendName.OPENAI, model="gpulb-name", served_model=MODEL,
                                  base_url=server.url, max_concurrency=8, request_timeout_s=3.0)  # fmt: skip
        b = OpenAIServerBackend.from_settings(settings)
        assert (b.name, b.model, b.base_url, b.max_concurrency) == ("openai", MODEL, server.url, 8)
        assert b.generate([prompt("z", 1)])[0].text == "z"
        b.shutdown()

    def test_base_url_is_required(self) -> None:
        with pytest.raises(ConfigError, match=r"needs --base-url \(e.g. http://localhost:8000\)"):
            OpenAIServerBackend.from_settings(WorkerSettings(model=MODEL))


class TestLifecycle:
    def test_start_waits_for_health(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        server.healthy = False
        threading.Timer(0.3, lambda: setattr(server, "healthy", True)).start()
        started = time.monotonic()
        with capture_logs() as logs:
            backend.start()
        assert 0.3 <= time.monotonic() - started < 2.0
        assert server.paths().count("/health") >= 2
        assert server.paths()[-2:] == ["/v1/models", "/server_info?config_format=json"]
        assert [e["event"] for e in logs] == ["waiting for the engine server", "engine server is up"]

    def test_start_times_out_naming_the_url(self, server: FakeOpenAIServer) -> None:
        server.healthy = False
        b = make_backend(server.url, startup_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(BackendError, match=rf"{server.url}/health was not healthy within 0.3 s"):
            b.start()
        assert time.monotonic() - started < 1.5
        b.shutdown()

    def test_start_refuses_a_model_the_server_does_not_serve(self, server: FakeOpenAIServer) -> None:
        b = OpenAIServerBackend(server.url, "other-model")
        with pytest.raises(ConfigError, match=rf"serves \['{MODEL}'\], not 'other-model': set --served-model"):
            b.start()
        b.shutdown()

    def test_healthy(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        assert backend.healthy()
        server.healthy = False
        assert not backend.healthy()
        server.healthy = True
        assert backend.healthy()
        server.stop()
        assert not backend.healthy()

    def test_healthy_after_shutdown_is_false(self, backend: OpenAIServerBackend) -> None:
        backend.shutdown()
        assert not backend.healthy()
        assert backend.engine_load() == EngineLoad()


class TestContinuous:
    def test_requests_finish_on_their_own_and_callbacks_run_on_the_loop(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        server.hold_containing("HOLD")
        held = backend.submit(prompt("HOLD me", 2))
        assert eventually(lambda: server.in_flight == 1)
        quick = backend.submit(chat("quick", 1))
        assert quick.result(timeout=5).text == "be" and not held.done()
        thread: Future[str] = Future()
        held.add_done_callback(lambda _: thread.set_result(threading.current_thread().name))
        server.release_held()
        assert held.result(timeout=5).text == "HOLD me"
        assert thread.result(timeout=5) == "gpulb-openai-loop"

    def test_abort_closes_the_connection_so_the_server_drops_the_request(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        server.hold_containing("HOLD")
        held = [backend.submit(prompt(f"HOLD {i}", 1)) for i in range(3)]
        assert eventually(lambda: server.in_flight == 3)
        backend.abort(held[0])
        assert held[0].cancelled()
        assert eventually(lambda: server.disconnects == 1 and server.in_flight == 2)  # vLLM would abort it here
        server.release_held()
        assert [f.result(timeout=5).text for f in held[1:]] == ["HOLD", "HOLD"]
        assert server.disconnects == 1
        assert backend.generate([prompt("after", 1)])[0].text == "after"  # the pool recovered its connection

    def test_at_most_max_concurrency_in_flight(self, server: FakeOpenAIServer) -> None:
        b = make_backend(server.url, max_concurrency=2)
        server.delay_s = 0.05
        assert [o.text for o in b.generate([prompt(f"p{i}", 1) for i in range(8)])] == [f"p{i}" for i in range(8)]
        assert server.max_in_flight == 2
        b.shutdown()

    def test_a_full_pool_leaves_health_and_metrics_free(self, server: FakeOpenAIServer) -> None:
        b = make_backend(server.url, max_concurrency=2)
        server.hold_containing("HOLD")
        held = [b.submit(prompt("HOLD", 1)) for _ in range(3)]
        assert eventually(lambda: server.in_flight == 2)
        assert b.healthy() and b.engine_load().running == 2
        server.release_held()
        assert [f.result(timeout=5).text for f in held] == ["HOLD"] * 3
        b.shutdown()

    def test_slots_are_max_concurrency_or_the_servers_max_num_seqs_if_fewer(self, server: FakeOpenAIServer) -> None:
        wide, narrow = make_backend(server.url, max_concurrency=256), make_backend(server.url, max_concurrency=16)
        wide.start()
        assert wide.slots() == 256  # the server does not say (vLLM's default: /server_info is dev mode only)
        server.max_num_seqs = 64
        for b, expected in ((wide, 64), (narrow, 16)):
            b.start()
            assert b.slots() == expected
            b.shutdown()

    def test_shutdown_cancels_what_is_in_flight_and_refuses_more(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        server.hold_containing("HOLD")
        held = backend.submit(prompt("HOLD", 1))
        assert eventually(lambda: server.in_flight == 1)
        backend.shutdown()
        assert held.cancelled()
        assert eventually(lambda: server.disconnects == 1)
        with pytest.raises(BackendError, match="after shutdown"):
            backend.submit(prompt("late", 1))


class TestStreaming:
    def test_a_completion_streams_its_pieces_and_ends_as_unstreamed(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        pieces: list[tuple[str, str]] = []

        def on_text(piece: str) -> None:
            pieces.append((piece, threading.current_thread().name))

        text = "alpha beta gamma"
        streamed, whole = backend.generate([prompt(text, 5, on_text, seed=7), prompt(text, 5)])
        assert streamed == whole == BackendOutput(f"{text} alpha beta", 5, prompt_tokens=3, finish_reason="length")
        assert pieces == [(p, "gpulb-openai-loop") for p in ("alpha", " beta", " gamma", " alpha", " beta")]
        assert sorted(server.completion_bodies(), key=len) == [  # sent concurrently: in either order
            {"model": MODEL, "max_tokens": 5, "prompt": text},
            {"model": MODEL, "max_tokens": 5, "prompt": text, "seed": 7, "stream": True,
             "stream_options": {"include_usage": True}},
        ]  # fmt: skip

    def test_a_chat_streams_its_delta_content(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        pieces: list[str] = []
        [out] = backend.generate([chat("hello there", 3, pieces.append)])
        assert out == BackendOutput("be brief hello", 3, prompt_tokens=4, finish_reason="length")
        assert pieces == ["be", " brief", " hello"]  # the opening role chunk's empty content is no piece
        assert server.paths() == ["/v1/chat/completions"]

    def test_a_stop_string_ends_the_stream_with_stop(self, backend: OpenAIServerBackend) -> None:
        pieces: list[str] = []
        [out] = backend.generate([prompt("one two three four", 8, pieces.append, stop=["three"])])
        assert (out.text, out.output_tokens, out.finish_reason, pieces) == ("one two", 2, "stop", ["one", " two"])

    def test_errors_before_the_stream_keep_their_mapping(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        pieces: list[str] = []
        server.reject_containing("TOO-LONG", "This model's maximum context length is 4096 tokens.")
        server.fail_next(1)
        [busy] = backend.generate([prompt("a", 1, pieces.append)])
        [bad] = backend.generate([chat("TOO-LONG", 1, pieces.append)])
        assert (busy.retryable, busy.error_status, busy.error) == (
            True, None, "HTTP 503 from /v1/completions: Service unavailable (injected 503)",
        )  # fmt: skip
        assert (bad.retryable, bad.error_status, bad.error) == (
            False, 400, "HTTP 400 from /v1/chat/completions: This model's maximum context length is 4096 tokens.",
        )  # fmt: skip
        server.drop_next(1)
        [dropped] = backend.generate([prompt("a", 1, pieces.append)])
        assert dropped.retryable and dropped.error is not None and "RemoteProtocolError" in dropped.error
        assert pieces == []

    def test_abort_mid_stream_closes_the_connection_so_the_server_drops_the_request(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        server.hold_containing("HOLD")
        pieces: list[str] = []
        held = backend.submit(prompt("HOLD a b", 3, pieces.append))
        assert eventually(lambda: pieces == ["HOLD"] and server.in_flight == 1)  # the first chunk, then held
        backend.abort(held)
        assert held.cancelled()
        assert eventually(lambda: server.disconnects == 1 and server.in_flight == 0)  # vLLM would abort it here
        server.release_held()
        assert backend.generate([prompt("after", 1, pieces.append)])[0].text == "after"
        assert pieces == ["HOLD", "after"]

    def test_a_sink_that_raises_fails_its_request_and_closes_the_stream(
        self, server: FakeOpenAIServer, backend: OpenAIServerBackend
    ) -> None:
        def broken(piece: str) -> None:
            raise RuntimeError("the reader is gone")

        server.hold_containing("HOLD")
        with pytest.raises(RuntimeError, match="the reader is gone"):
            backend.submit(prompt("HOLD a", 2, broken)).result(timeout=5)
        assert eventually(lambda: server.disconnects == 1 and server.in_flight == 0)  # vLLM would abort it here

    def test_streams_keep_their_connection(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        for i in range(3):
            assert backend.generate([prompt(f"p{i} q", 2, lambda piece: None)])[0].text == f"p{i} q"
        assert server.connections_opened == 1


class TestStreamedCompletion:
    def test_without_usage_the_pieces_are_a_lower_bound_on_tokens(self) -> None:
        pieces: list[str] = []
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]}]  # fmt: skip
        lines = [": keep-alive comment", "event: message", *sse(*chunks, "[DONE]")]
        assert folded(lines, pieces) == BackendOutput("Hi there", 2, prompt_tokens=0, finish_reason="stop")
        assert pieces == ["Hi", " there"]

    def test_finish_reason_and_usage_from_the_chunks_that_carry_them(self) -> None:
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        chunks = [{"choices": [{"text": "a", "finish_reason": None}], "usage": None},
                  {"choices": [{"text": "", "finish_reason": "length"}], "usage": None},
                  {"choices": [], "usage": usage}]  # fmt: skip
        assert folded(sse(*chunks, "[DONE]")) == BackendOutput("a", 3, prompt_tokens=7, finish_reason="length")

    def test_an_error_mid_stream_fails_the_request(self) -> None:
        error = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "code": 500}}
        out = folded(sse({"choices": [{"text": "a"}]}, error, "[DONE]"))
        assert (out.error, out.retryable, out.error_status) == (
            "error in the stream from /v1/completions: EngineCore encountered an issue.", False, None,
        )  # fmt: skip
        old = folded(sse({"object": "error", "message": "old vllm", "code": 400}, "[DONE]"))
        assert old.error == "error in the stream from /v1/completions: old vllm"

    def test_a_malformed_chunk_fails_the_request(self) -> None:
        for line in ("data: {not json", 'data: {"choices": [{"text": 3}]}', "data: [1, 2]",
                     'data: {"choices": [], "usage": {"prompt_tokens": "x"}}'):  # fmt: skip
            out = folded([line, "", "data: [DONE]"])
            assert out.error is not None and out.error.startswith("malformed stream from the engine server")
            assert not out.retryable

    def test_a_stream_cut_before_its_end_is_retryable(self) -> None:
        out = folded(sse({"choices": [{"text": "a", "finish_reason": None}]}))
        assert (out.error, out.retryable) == ("the stream from /v1/completions ended before [DONE]", True)


class TestEngineLoad:
    def test_reads_vllm_metrics_from_the_server(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        assert backend.engine_load() == EngineLoad(running=0, waiting=0, kv_cache_usage=0.0, generated_tokens=0)
        backend.generate([prompt("a b c", 4), chat("x", 2)])
        server.waiting, server.kv_cache_usage = 3, 0.25
        assert backend.engine_load() == EngineLoad(running=0, waiting=3, kv_cache_usage=0.25, generated_tokens=6)

    def test_counts_running_requests(self, server: FakeOpenAIServer, backend: OpenAIServerBackend) -> None:
        server.delay_s = 0.5
        thread = threading.Thread(target=backend.generate, args=([prompt(f"p{i}", 1) for i in range(3)],))
        thread.start()
        deadline = time.monotonic() + 2
        while server.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.engine_load().running == 3
        thread.join()

    def test_falls_back_to_trtllm_path_and_remembers_it(self) -> None:
        with FakeOpenAIServer(MODEL, metrics_path="/prometheus/metrics") as fake:
            b = make_backend(fake.url)
            assert b.engine_load().generated_tokens == 0
            assert b.engine_load().generated_tokens == 0
            assert [p for p in fake.paths() if "metrics" in p] == ["/metrics", "/prometheus/metrics",
                                                                   "/prometheus/metrics"]  # fmt: skip
            b.shutdown()

    def test_explicit_metrics_path(self, server: FakeOpenAIServer) -> None:
        b = make_backend(server.url, metrics_path="/nowhere")
        with capture_logs() as logs:
            assert b.engine_load() == EngineLoad()
            assert b.engine_load() == EngineLoad()
        assert [e["event"] for e in logs] == ["engine metrics unavailable"]
        assert server.paths() == ["/nowhere", "/nowhere"]
        b.shutdown()

    def test_unreachable_server_gives_empty_load(self) -> None:
        b = make_backend(f"http://127.0.0.1:{free_port()}")
        assert b.engine_load() == EngineLoad()
        b.shutdown()


TRTLLM = """\
# HELP trtllm_num_requests_running Number of running requests
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{model_name="llama-8b",engine_type="trtllm"} 5.0
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{model_name="llama-8b",engine_type="trtllm"} 2.0
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{model_name="llama-8b",engine_type="trtllm"} 0.62
# TYPE trtllm_generation_tokens_total counter
trtllm_generation_tokens_total{model_name="llama-8b",engine_type="trtllm"} 12345.0
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",dp_rank="0"} 4.0
sglang:num_running_reqs{model_name="qwen",dp_rank="1"} 3.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",dp_rank="0"} 1.0
sglang:num_queue_reqs{model_name="qwen",dp_rank="1"} 0.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen",dp_rank="0"} 0.5
sglang:token_usage{model_name="qwen",dp_rank="1"} 0.3
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="qwen",dp_rank="0"} 812.5
"""

OLD_VLLM = """\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.4
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{model_name="m"} 99.0
vllm:generation_tokens_created{model_name="m"} 1.7e9
"""


class TestParseEngineMetrics:
    def test_tensorrt_llm(self) -> None:
        assert parse_engine_metrics(TRTLLM) == EngineLoad(running=5, waiting=2, kv_cache_usage=0.62,
                                                          generated_tokens=12345)  # fmt: skip

    def test_sglang_sums_counts_and_averages_usage_over_ranks(self) -> None:
        assert parse_engine_metrics(SGLANG) == EngineLoad(running=7, waiting=1, kv_cache_usage=0.4)

    def test_old_vllm_cache_name_and_created_samples(self) -> None:
        assert parse_engine_metrics(OLD_VLLM) == EngineLoad(running=1, kv_cache_usage=0.4, generated_tokens=99)

    def test_current_vllm_name_wins_over_the_old_one(self) -> None:
        text = OLD_VLLM + '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.9\n'
        assert parse_engine_metrics(text).kv_cache_usage == 0.9

    def test_the_fake_servers_text_parses_as_vllm(self) -> None:
        fake = FakeOpenAIServer(MODEL)
        fake.waiting, fake.kv_cache_usage, fake.generation_tokens = 2, 0.5, 40
        assert parse_engine_metrics(fake.metrics_text()) == EngineLoad(running=0, waiting=2, kv_cache_usage=0.5,
                                                                       generated_tokens=40)  # fmt: skip

    def test_untyped_counter_and_nan(self) -> None:
        text = "trtllm_generation_tokens_total 7\ntrtllm_kv_cache_utilization NaN\ntrtllm_num_requests_running 2\n"
        assert parse_engine_metrics(text) == EngineLoad(running=2, generated_tokens=7)

    def test_unknown_or_broken_text(self) -> None:
        assert parse_engine_metrics("") == EngineLoad()
        assert parse_engine_metrics("tgi_queue_size 3\n") == EngineLoad()
        assert parse_engine_metrics("this is {not prometheus\n") == EngineLoad()


class TestFakeServerProcess:
    def test_runs_as_a_module_and_takes_faults_over_http(self) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "tests.fake_openai_server", "--port", "0", "--model", MODEL],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            httpx.post(f"{url}/_fake/faults", json={"fail_next": 1}).raise_for_status()
            b = make_backend(url)
            [outcome] = executor(b).run([prompt("hi", 2)], tokens_per_s=1e6)
            assert (outcome.output.text, outcome.tries) == ("hi hi", 2)
            assert httpx.get(f"{url}/_fake/stats").json() == {"requests": 4, "max_in_flight": 1,
                                                              "generation_tokens": 2}  # fmt: skip
            b.shutdown()
        finally:
            proc.terminate()
            assert proc.wait(5) == 0
            if proc.stdout is not None:
                proc.stdout.close()


class TestEmbeddings:
    def test_inputs_go_to_the_servers_embeddings_in_order(self) -> None:
        with FakeOpenAIServer(MODEL, embeddings=True) as server:
            backend = make_backend(server.url)
            backend.start()
            try:
                [out] = backend.generate([BackendRequest(None, 1, inputs=["one two", "three"])])
            finally:
                backend.shutdown()
        assert out.error is None and out.embeddings == [fake_embedding("one two"), fake_embedding("three")]
        assert (out.prompt_tokens, out.output_tokens, out.text) == (3, 0, "")
        assert server.requests[-1].body == {"model": MODEL, "input": ["one two", "three"], "encoding_format": "float"}

    def test_a_server_without_embeddings_answers_each_such_request_a_404(self, backend: OpenAIServerBackend) -> None:
        [out] = backend.generate([BackendRequest(None, 1, inputs=["x"])])
        assert (out.error_status, out.retryable, out.embeddings) == (404, False, None)
        assert out.error is not None and out.error.startswith("HTTP 404 from /v1/embeddings")
