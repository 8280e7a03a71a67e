"""A small, real OpenAI-compatible HTTP server for tests: what ``vllm serve`` answers, without a GPU.

Endpoints: ``/health``, ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (OpenAI's
response shapes), ``/metrics`` (vLLM's Prometheus text) and, when ``max_num_seqs`` is set, ``/server_info``
(vLLM's config, which ``vllm serve`` shows only with ``VLLM_SERVER_DEV_MODE=1``). The output is
deterministic: the prompt's words (a chat's message contents) repeated to ``max_tokens`` words, cut before
the first ``stop`` string if any (finish_reason "stop", else "length"); prompt_tokens is the prompt's word
count.
With ``"stream": true`` both endpoints answer as vLLM does, in server-sent events (``data: {chunk}`` then
``data: [DONE]``): a piece of text per chunk (a word with the space before it; a chat opens with a
``role`` chunk), ``finish_reason`` on the last piece's chunk, and with ``stream_options.include_usage`` a
last chunk with no choices and the usage.

Faults a test sets (they apply to the two completion endpoints only, never to /health or /metrics):
``fail_next(n, status)``, ``drop_next(n)`` (close the connection without an answer),
``reject_containing(marker, message)`` (400 for prompts holding ``marker``), ``hold_containing(marker)``
(prompts holding ``marker`` wait for ``release_held()``; one whose client closes the connection meanwhile
is dropped and counted in ``disconnects``, as vLLM's server aborts it; a streamed one sends its first chunk,
then waits), ``healthy = False`` (/health answers 503), ``api_key`` (401 without ``Authorization: Bearer
<key>``), ``delay_s``.

In-process::

    with FakeOpenAIServer(model="m") as server:
        server.fail_next(1)
        ... server.url, server.requests, server.max_in_flight ...

As a process (prints its URL on stdout once listening, serves until SIGTERM or SIGINT)::

    python -m tests.fake_openai_server --port 8000 --model m [--api-key K] [--delay-s 0.01]
    python tests/fake_openai_server.py --port 8000

A process is steered over HTTP: ``POST /_fake/faults`` with any of ``{"fail_next": N, "fail_status":
503, "drop_next": N, "healthy": false, "delay_s": 0.1, "reject_containing": "X"}``, and
``GET /_fake/stats`` for ``{"requests", "max_in_flight", "generation_tokens"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import re
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
EMBEDDINGS_PATH = "/v1/embeddings"
HOLD_POLL_S = 0.01


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class _Faults:
    fail_next: int = 0
    fail_status: int = 503
    drop_next: int = 0
    rejects: dict[str, str] = field(default_factory=dict)


def echo_words(prompt: str, max_tokens: int) -> list[str]:
    words = prompt.split() or [""]
    return list(itertools.islice(itertools.cycle(words), max_tokens))


def generate(prompt: str, max_tokens: int, stop: Any) -> tuple[str, str]:
    """The deterministic output text and its finish reason."""
    text = " ".join(echo_words(prompt, max_tokens))
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [text.find(s) for s in stops if s and s in text]
    if cuts:
        return text[: min(cuts)].rstrip(), "stop"
    return text, "length"


def fake_embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 6) for b in digest[:8]]


def stream_pieces(text: str) -> list[str]:
    """The pieces a stream sends: each word with the whitespace before it (they join to ``text``)."""
    return re.findall(r"\s*\S+|\s+", text)


def prompt_text(path: str, body: dict[str, Any]) -> str:
    if path == "/v1/completions":
        prompt = body.get("prompt", "")
        return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return " ".join(str(m.get("content") or "") for m in body.get("messages", []))


class FakeOpenAIServer:
    """Serve on ``host:port`` (port 0: a free one) in a background thread; ``url`` once started."""

    def __init__(
        self, model: str = "fake-model", *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
        delay_s: float = 0.0, max_model_len: int = 4096, metrics_path: str = "/metrics", embeddings: bool = False,
    ) -> None:  # fmt: skip
        self.model = model
        self.embeddings = embeddings  # it serves /v1/embeddings (a pooling model); else that path is a 404
        self.metrics_path = metrics_path  # "/prometheus/metrics": where trtllm-serve has it
        self.api_key = api_key
        self.delay_s = delay_s
        self.max_model_len = max_model_len
        self.max_num_seqs: int | None = None  # set: /server_info answers with it, as vLLM's does in dev mode
        self.healthy = True
        self.waiting = 0  # what vllm:num_requests_waiting reports
        self.kv_cache_usage = 0.0  # what vllm:kv_cache_usage_perc reports
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.disconnects = 0  # held requests whose client closed the connection before the answer
        self.connections_opened = 0  # TCP connections accepted: fewer than requests where keep-alive reuses them
        self.lock = threading.Lock()
        self._faults = _Faults()
        self._hold_marker: str | None = None
        self._released = threading.Event()
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.started_at = time.time()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the fake server is not started")
        return f"http://{self._address[0]}:{self._httpd.server_port}"

    def start(self) -> FakeOpenAIServer:
        self._httpd = _HTTPServer(self._address, _Handler, self)
        serve = self._httpd.serve_forever
        self._thread = threading.Thread(target=serve, args=(0.02,), name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection (keep-alive ones included)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_connections()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- fault injection ---------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` completion requests get ``status`` with an OpenAI error body."""
        with self.lock:
            self._faults.fail_next, self._faults.fail_status = n, status

    def drop_next(self, n: int) -> None:
        """The next ``n`` completion requests are read, then their connection is closed without an answer."""
        with self.lock:
            self._faults.drop_next = n

    def reject_containing(self, marker: str, message: str | None = None) -> None:
        """Completion requests whose prompt holds ``marker`` get 400 with ``message``."""
        with self.lock:
            self._faults.rejects[marker] = message or f"This prompt contains {marker!r}, which is not allowed."

    def hold_containing(self, marker: str) -> None:
        """Completion requests whose prompt holds ``marker`` wait, unanswered, until ``release_held()``."""
        self._released.clear()
        self._hold_marker = marker

    def release_held(self) -> None:
        self._released.set()

    def paths(self) -> list[str]:
        with self.lock:
            return [r.path for r in self.requests]

    def completion_bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.requests if r.path in COMPLETION_PATHS]

    # -- what the handler calls -------------------------------------------------------------------

    def held(self, prompt: str, client_gone: Callable[[], bool]) -> bool:
        """Wait while ``prompt`` is held; False (counted) if its client went away first."""
        if self._hold_marker is None or self._hold_marker not in prompt:
            return True
        while not self._released.wait(HOLD_POLL_S):
            if client_gone():
                with self.lock:
                    self.disconnects += 1
                return False
        return True

    def take_fault(self, prompt: str) -> tuple[str, int, str] | None:
        """("drop"|"error", status, message) for this completion request, or None to serve it."""
        with self.lock:
            faults = self._faults
            if faults.drop_next > 0:
                faults.drop_next -= 1
                return "drop", 0, ""
            if faults.fail_next > 0:
                faults.fail_next -= 1
                return "error", faults.fail_status, f"Service unavailable (injected {faults.fail_status})"
            for marker, message in faults.rejects.items():
                if marker in prompt:
                    return "error", 400, message
        return None

    def set_faults(self, spec: dict[str, Any]) -> None:
        if "fail_next" in spec:
            self.fail_next(int(spec["fail_next"]), int(spec.get("fail_status", 503)))
        if "drop_next" in spec:
            self.drop_next(int(spec["drop_next"]))
        if "reject_containing" in spec:
            self.reject_containing(str(spec["reject_containing"]), spec.get("reject_message"))
        if "healthy" in spec:
            self.healthy = bool(spec["healthy"])
        if "delay_s" in spec:
            self.delay_s = float(spec["delay_s"])

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": len(self.requests), "max_in_flight": self.max_in_flight,
                    "generation_tokens": self.generation_tokens}  # fmt: skip

    def metrics_text(self) -> str:
        """vLLM's /metrics, as its prometheus_client registry writes it (the gpulb-relevant part)."""
        labels = f'engine="0",model_name="{self.model}"'
        with self.lock:
            rows = [
                ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
                 float(self.in_flight)),
                ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
                 float(self.waiting)),
                ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
                 float(self.kv_cache_usage)),
                ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
                 float(self.prompt_tokens)),
                ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
                 float(self.generation_tokens)),
            ]  # fmt: skip
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value!r}"]
            if kind == "counter":
                created = name.removesuffix("_total") + "_created"
                lines.append(f"{created}{{{labels}}} {self.started_at!r}")
        return "\n".join(lines) + "\n"

    def completion(self, path: str, body: dict[str, Any], prompt: str) -> dict[str, Any]:
        text, finish = generate(prompt, int(body.get("max_tokens") or 16), body.get("stop"))
        common = {"created": int(time.time()), "model": self.model, "usage": self._count(prompt, text)}
        if path == "/v1/completions":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **common, "choices": [choice]}
        message = {"role": "assistant", "content": text, "tool_calls": []}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", **common, "choices": [choice]}

    def completion_chunks(self, path: str, body: dict[str, Any], prompt: str) -> list[dict[str, Any]]:
        """A streamed answer's chunks, as vLLM's server sends them (each one ``data: {chunk}``)."""
        text, finish = generate(prompt, int(body.get("max_tokens") or 16), body.get("stop"))
        chat = path != "/v1/completions"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "object": "chat.completion.chunk" if chat else "text_completion", "model": self.model}  # fmt: skip
        pieces = stream_pieces(text) or [""]
        reasons = [None] * (len(pieces) - 1) + [finish]
        choices = [stream_choice(chat, piece, reason) for piece, reason in zip(pieces, reasons, strict=True)]
        if chat:
            choices.insert(0, {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None})  # fmt: skip
        chunks = [{**head, "choices": [choice], "usage": None} for choice in choices]
        usage = self._count(prompt, text)
        wants_usage = (body.get("stream_options") or {}).get("include_usage") is True
        return [*chunks, {**head, "choices": [], "usage": usage}] if wants_usage else chunks

    def _count(self, prompt: str, text: str) -> dict[str, int]:
        """The usage of one answer, added to the server's counters."""
        usage_in, usage_out = len(prompt.split()), len(text.split())
        with self.lock:
            self.prompt_tokens += usage_in
            self.generation_tokens += usage_out
        return {"prompt_tokens": usage_in, "total_tokens": usage_in + usage_out, "completion_tokens": usage_out}

    def embeddings_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's pooling server's answer: one vector per input (from its hash, as gpulb's simulator makes them),
        listed in reverse to check that the client orders them by index."""
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": fake_embedding(t)} for i, t in enumerate(texts)]
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "model": body.get("model"), "data": data[::-1],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    def server_info(self) -> dict[str, Any]:
        scheduler = {"max_num_seqs": self.max_num_seqs, "max_num_active_seqs": None, "max_num_batched_tokens": 2048}
        return {"vllm_config": {"scheduler_config": scheduler, "model_config": {"max_model_len": self.max_model_len}}}

    def models(self) -> dict[str, Any]:
        card = {"id": self.model, "object": "model", "created": int(self.started_at), "owned_by": "vllm",
                "root": self.model, "parent": None, "max_model_len": self.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}


def stream_choice(chat: bool, piece: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish, "stop_reason": None}


class _HTTPServer(ThreadingHTTPServer):
    """Tracks its connections so that ``stop()`` can close keep-alive ones too."""

    block_on_close = False
    request_queue_size = 1024  # socketserver's 5 drops a batch's simultaneous connects (a 1 s SYN retry)

    def __init__(self, address: tuple[str, int], handler: type[_Handler], fake: FakeOpenAIServer) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        with self.fake.lock:
            self.fake.connections_opened += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            open_now = list(self.connections)
        for conn in open_now:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read their own output
        pass

    @property
    def fake(self) -> FakeOpenAIServer:
        return self.server.fake

    def do_GET(self) -> None:
        self._record(None)
        if self.path == "/health":
            self._send(200 if self.fake.healthy else 503, b"", "application/json")
        elif self.path == self.fake.metrics_path:
            self._send(200, self.fake.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif self.path.split("?")[0] == "/server_info" and self.fake.max_num_seqs is not None:
            self._json(200, self.fake.server_info())
        elif self.path == "/_fake/stats":
            self._json(200, self.fake.stats())
        elif self.path == "/v1/models":
            if self._authorized():
                self._json(200, self.fake.models())
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
        except ValueError as exc:
            self._record(None)
            return self._error(400, f"invalid JSON body: {exc}")
        self._record(body)
        if self.path == "/_fake/faults":
            self.fake.set_faults(body)
            return self._json(200, {"ok": True})
        if self.path == EMBEDDINGS_PATH and self.fake.embeddings and self._authorized():
            return self._json(200, self.fake.embeddings_answer(body))
        if self.path not in COMPLETION_PATHS:
            return self._json(404, {"detail": "Not Found"})
        if self._authorized():
            self._serve_completion(body)

    def _serve_completion(self, body: Any) -> None:
        fake = self.fake
        if not isinstance(body, dict):
            return self._error(400, "the request body must be a JSON object")
        if body.get("model") != fake.model:
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        with fake.lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            if fake.delay_s:
                time.sleep(fake.delay_s)
            if body.get("stream") is True or fake.held(prompt_text(self.path, body), self._client_gone):
                self._answer_completion(body)  # a stream is held after its first chunk
            else:
                self.close_connection = True
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _answer_completion(self, body: dict[str, Any]) -> None:
        prompt = prompt_text(self.path, body)
        fault = self.fake.take_fault(prompt)
        if fault is None and body.get("stream") is True:
            self._stream(self.fake.completion_chunks(self.path, body, prompt), prompt)
        elif fault is None:
            self._json(200, self.fake.completion(self.path, body, prompt))
        elif fault[0] == "drop":
            self.close_connection = True  # the server closes the socket; nothing was written
        else:
            self._error(fault[1], fault[2])

    def _stream(self, chunks: list[dict[str, Any]], prompt: str) -> None:
        """Send ``chunks`` as server-sent events (chunked, keep-alive, as uvicorn does); a client that goes
        away meanwhile is counted in ``disconnects``."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n", b""]
        try:
            for i, event in enumerate(events):
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()
                if i == 0 and not self.fake.held(prompt, self._client_gone):
                    self.close_connection = True
                    return
        except (BrokenPipeError, ConnectionResetError):
            with self.fake.lock:
                self.fake.disconnects += 1
            self.close_connection = True

    def _client_gone(self) -> bool:
        """Whether the client closed its end: the socket reads as ended (a request body was read in full)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        return not peeked

    def _authorized(self) -> bool:
        key = self.fake.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._json(401, {"error": "Unauthorized"})
        return False

    def _record(self, body: Any) -> None:
        entry = RecordedRequest(self.command, self.path, body, dict(self.headers.items()))
        with self.fake.lock:
            self.fake.requests.append(entry)

    def _error(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible (vLLM-like) server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (the URL printed says which)")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--delay-s", type=float, default=0.0, help="added to each completion request")
    args = parser.parse_args(argv)
    server = FakeOpenAIServer(args.model, host=args.host, port=args.port, api_key=args.api_key, delay_s=args.delay_s)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with server:
        print(server.url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
