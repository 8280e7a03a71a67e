"""The ``gpulb`` command: its options and verbs; it launches the roles.

Every option has an environment variable (shown in ``--help``); options override the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gpulb.cli import batch, local
from gpulb.cli.stack import WORKER_ID_IN_USE_EXIT
from gpulb.connection import broker_errors, connect, redact_url
from gpulb.errors import ConfigError, GpulbError, WorkerIdInUse, field_error
from gpulb.logs import configure_logging
from gpulb.settings import Settings

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process that SIGPIPE ended: 128 + 13


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    section: str | None  # None: a top-level setting
    name: str
    help: str
    type: Any = str

    @property
    def env(self) -> str:
        return (
            f"GPULB_{self.name.upper()}"
            if self.section is None
            else (f"GPULB_{self.section.upper()}__{self.name.upper()}")
        )


GATEWAY = [
    Option("--host", "gateway", "host", "address to listen on (0.0.0.0: every interface)"),
    Option("--port", "gateway", "port", "port to listen on", int),
    Option("--max-file-bytes", "gateway", "max_file_bytes", "largest upload accepted", int),
    Option("--online-priority", "gateway", "online_priority", "priority of online requests (batches: 0)", int),
]
COMMON = [
    Option("--redis-url", None, "redis_url", "Redis URL (redis://[:password@]host:port/db)"),
    Option("--log-level", None, "log_level", "debug, info, warning or error"),
    Option("--log-format", None, "log_format", "auto (console on a terminal, else JSON), json or console"),
    Option(
        "--max-attempts",
        None,
        "max_attempts",
        "runs of a request (worker crashes, backend errors) before it is recorded as failed",
        int,
    ),
]
METRICS = Option("--metrics-port", None, "metrics_port", "serve Prometheus metrics at :PORT/metrics", int)
BALANCER = [
    METRICS,
    Option(
        "--policy",
        "balancer",
        "policy",
        "least-time (default), prefix-affinity, or a baseline: round-robin, random, least-loaded, power-of-two",
    ),
    Option("--batch-target-s", "balancer", "batch_target_s", "seconds of a worker's time per micro-batch", float),
    Option(
        "--max-outstanding-batches",
        "balancer",
        "max_outstanding_batches",
        "micro-batches a worker may hold (running + queued); the rest waits in the ingress",
        int,
    ),
    Option(
        "--prior-tokens-per-s",
        "balancer",
        "prior_tokens_per_s",
        "assumed speed of a worker before it has measured its own",
        float,
    ),
]
WORKER = [
    METRICS,
    Option("--id", "worker", "id", "worker id, also its RQ queue name (default HOST-gpuN)"),
    Option("--model", "worker", "model", "model this worker serves (requests for it are routed here)"),
    Option(
        "--backend",
        "worker",
        "backend",
        "inference backend: simulated (a continuous-batching engine), simulated-linear, transformers, openai, vllm, "
        "tensorrt-llm",
    ),
    Option(
        "--model-path", "worker", "model_path", "what the engine loads: a local directory or hub id (default: --model)"
    ),
    Option(
        "--dtype",
        "worker",
        "dtype",
        "weights' dtype for transformers / vLLM / TensorRT-LLM: auto, float16, bfloat16...",
    ),
    Option(
        "--engine-args",
        "worker",
        "engine_args",
        "JSON object of extra engine arguments, e.g. '{\"gpu_memory_utilization\": 0.85}'",
        _json_object,
    ),
    Option("--base-url", "worker", "base_url", "openai backend: the server's URL, e.g. http://localhost:8000"),
    Option("--api-key", "worker", "api_key", "openai backend: bearer token for the server (never logged)"),
    Option(
        "--served-model", "worker", "served_model", "openai backend: the model name the server knows (default: --model)"
    ),
    Option(
        "--max-concurrency", "worker", "max_concurrency", "openai backend: most requests in flight to the server", int
    ),
    Option(
        "--startup-timeout-s", "worker", "startup_timeout_s", "seconds to load the model or wait for the server", float
    ),
    Option(
        "--tokens-per-s", "worker", "tokens_per_s", "simulated backend: tokens/s generated with all slots busy", float
    ),
    Option("--max-batch", "worker", "max_batch", "most requests in one micro-batch", int),
    Option(
        "--slots",
        "worker",
        "slots",
        "sequences the engine runs at once (default: what the engine says, e.g. vLLM's max_num_seqs or the "
        "openai backend's --max-concurrency; 128 for the simulator)",
        int,
    ),
    Option(
        "--queue-slots",
        "worker",
        "queue_slots",
        "requests held beyond the slots, ready for the next free one (default: a quarter of the slots)",
        int,
    ),
    Option("--gpu", "worker", "gpu", "GPU index to pin this worker to (sets CUDA_VISIBLE_DEVICES)", int),
    Option("--heartbeat-s", "worker", "heartbeat_s", "seconds between load-key refreshes", float),
    Option("--load-ttl-s", "worker", "load_ttl_s", "load-key TTL: a silent worker is gone after this", float),
    Option(
        "--min-call-timeout-s",
        "worker",
        "min_call_timeout_s",
        "a backend call is abandoned after max(this, call-timeout-factor x its expected time)",
        float,
    ),
    Option(
        "--simulate-faults",
        "worker",
        "simulate_faults",
        "simulated backend: prompts with @@fail raise, @@hang hang (fault drills)",
        _yes_no,
    ),
]


def _add(
    parser: argparse.ArgumentParser, options: Sequence[Option], defaults: Settings, *, default: Any = None
) -> None:
    """``default``: ``argparse.SUPPRESS`` where a subcommand repeats a global option, so that an option left out
    after the command does not hide one given before it."""
    for opt in options:
        section = defaults if opt.section is None else getattr(defaults, opt.section)
        current = getattr(section, opt.name)
        shown = "unset" if current is None else getattr(current, "value", current)
        if opt.name == "redis_url":
            shown = redact_url(str(current))
        parser.add_argument(
            opt.flag,
            dest=f"{opt.section or ''}.{opt.name}",
            type=opt.type,
            default=default,
            metavar=opt.flag.lstrip("-").replace("-", "_").upper(),
            help=f"{opt.help} [env {opt.env}; now {shown}]",
        )


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpulb",
        description="Distribute GPU inference over a fleet of mixed-speed GPUs through Redis and RQ.",
        epilog="Quick start: gpulb demo (everything local, one command). Then: gpulb up in one terminal, "
        "gpulb submit FILE.jsonl -o OUT.jsonl and gpulb status --watch in another. "
        "On GPU hosts: gpulb balancer, and gpulb workers --gpus all --backend vllm --model M --model-path PATH.",
    )
    _add(parser, COMMON, defaults)
    common = argparse.ArgumentParser(add_help=False)  # the global options, accepted after the command too
    _add(common, COMMON, defaults, default=argparse.SUPPRESS)
    parents = [common]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bal = sub.add_parser(
        "balancer",
        parents=parents,
        help="run the balancer (one per fleet)",
        description="Place queued requests on workers by expected completion time.",
    )
    _add(bal, BALANCER, defaults)
    wrk = sub.add_parser(
        "worker",
        parents=parents,
        help="run one worker (one per GPU)",
        description="Host a model behind a backend and run micro-batches from this worker's own RQ queue.",
    )
    _add(wrk, WORKER, defaults)
    wrk.add_argument("--burst", action="store_true", help="exit when the queue is empty (tests, one-off runs)")
    sup = sub.add_parser(
        "workers",
        parents=parents,
        help="run and supervise one worker per GPU",
        description="Start one worker per GPU (each pinned with CUDA_VISIBLE_DEVICES and named HOST-gpuN, or "
        "ID-gpuN with --id), restart any that exits with a doubling backoff, and forward SIGTERM/SIGINT so "
        "that each drains before the supervisor exits. Takes every worker option.",
        epilog="Example: gpulb workers --gpus all --backend vllm --model meta-llama/Llama-3.1-8B-Instruct",
    )
    sup.add_argument("--gpus", required=True, help="GPU indices, comma-separated (0,1,2,3), or 'all'")
    _add(sup, [o for o in WORKER if o.name != "gpu"], defaults)
    gw = sub.add_parser(
        "gateway",
        parents=parents,
        help="serve the OpenAI API (files, batches, completions, chat, models) on this fleet",
        description="An OpenAI-compatible HTTP server: point the official openai client at http://HOST:PORT/v1. "
        "API keys come from GPULB_GATEWAY__API_KEYS (a JSON list); without keys every request is accepted.",
        epilog="Example: GPULB_GATEWAY__API_KEYS='[\"sk-local\"]' gpulb gateway --host 0.0.0.0 --port 8000",
    )
    _add(gw, GATEWAY, defaults)
    batch.add_parsers(sub, parents)
    local.add_parsers(sub, parents)
    st = sub.add_parser(
        "status",
        help="show workers with their load, pending requests per model, and batches in flight",
        parents=parents,
    )
    st.add_argument("--json", action="store_true", help="machine-readable output (with --watch: one object a line)")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default 2)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is None or "." not in dest:
            continue
        section, name = dest.split(".", 1)
        if section:
            overrides.setdefault(section, {})[name] = value
        else:
            overrides[name] = value
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        field, message = field_error(exc.errors()[0])
        raise ConfigError(f"invalid setting {field}: {message}") from exc
    if settings.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"invalid setting log_level: {settings.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can be caught, rather than at the interpreter's exit
        return code
    except BrokenPipeError:
        # Whoever read our output has gone (`gpulb status | head -1`): quietly, as a SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    try:
        defaults = Settings()
    except ValidationError as exc:
        field, message = field_error(exc.errors()[0])
        print(f"gpulb: error: invalid environment setting {field}: {message}", file=sys.stderr)
        return 2
    args = build_parser(defaults).parse_args(argv)
    try:
        settings = settings_from_args(args)
        configure_logging(settings.log_level, settings.log_format)
        return _run(args, settings)
    except WorkerIdInUse as exc:
        print(f"gpulb: error: {exc}", file=sys.stderr)
        return WORKER_ID_IN_USE_EXIT
    except GpulbError as exc:
        print(f"gpulb: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "balancer":
        from balancer.main import run_balancer

        run_balancer(settings)
    elif args.command == "worker":
        from worker.main import run_worker

        return run_worker(settings, burst=args.burst)
    elif args.command == "gateway":
        _run_gateway(settings)
    elif args.command == "up":
        return local.run_up(args, settings)
    elif args.command == "demo":
        return local.run_demo(args, settings)
    elif args.command == "submit":
        return batch.run_submit(args, settings)
    elif args.command == "batch":
        return batch.run_batch(args, settings)
    elif args.command == "workers":
        return _workers(args, settings)
    elif args.command == "status":
        return _status(settings, as_json=args.json, watch=args.watch, interval_s=args.interval)
    return 0


def _run_gateway(settings: Settings) -> None:
    try:
        from producer.gateway.app import run_gateway
    except ImportError as exc:
        raise ConfigError(f"the gateway needs FastAPI and uvicorn: pip install 'gpulb[gateway]' ({exc})") from exc
    run_gateway(settings)


def _given_options_as_env(args: argparse.Namespace) -> dict[str, str]:
    """The options given on this command line, as the environment variables a child reads them from."""
    env: dict[str, str] = {}
    for opt in [*COMMON, *WORKER]:
        if opt is METRICS:
            continue  # each supervised worker gets a port of its own
        value = getattr(args, f"{opt.section or ''}.{opt.name}", None)
        if value is not None:
            env[opt.env] = json.dumps(value) if isinstance(value, dict) else str(value)
    return env


def _workers(args: argparse.Namespace, settings: Settings) -> int:
    import os
    import subprocess

    from worker.gpu import parse_gpu_list
    from worker.supervisor import Supervisor

    gpus = parse_gpu_list(args.gpus)
    if not settings.worker.model:
        raise ConfigError("workers need a model: pass --model or set GPULB_WORKER__MODEL")
    base_env = {**os.environ, **_given_options_as_env(args)}

    def spawn(gpu: int) -> subprocess.Popen[bytes]:
        env = {**base_env, "GPULB_WORKER__GPU": str(gpu)}  # the worker pins itself, within what we may see
        if settings.worker.id:
            env["GPULB_WORKER__ID"] = f"{settings.worker.id}-gpu{gpu}"
        if settings.metrics_port is not None:
            env["GPULB_METRICS_PORT"] = str(settings.metrics_port + gpus.index(gpu))
        # A session of its own: a Ctrl-C on the terminal reaches only the supervisor, which forwards it once.
        return subprocess.Popen([sys.executable, "-m", "gpulb.cli", "worker"], env=env, start_new_session=True)

    return Supervisor(gpus, spawn).run()


def _status(settings: Settings, *, as_json: bool, watch: bool = False, interval_s: float = 2.0) -> int:
    import time

    from gpulb.cli.status import read_fleet_status, render_table

    conn = connect(settings)
    tty = sys.stdout.isatty()
    try:
        while True:
            with broker_errors(settings.redis_url):
                status = read_fleet_status(conn)
            if as_json:
                doc = {"redis_url": redact_url(settings.redis_url), "ts": time.time(), **status.as_dict()}
                print(json.dumps(doc, indent=None if watch else 2), flush=True)
            else:
                clear = "\x1b[H\x1b[2J" if watch and tty else ""
                stamp = time.strftime("%H:%M:%S")
                print(
                    f"{clear}redis: {redact_url(settings.redis_url)}    {stamp}\n\n{render_table(status)}", flush=True
                )
            if not watch:
                return 0
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
