"""``gpulb submit`` and ``gpulb batch ...``: OpenAI Batch files in and out, with a live progress bar."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from gpulb.cli.progress import ProgressReporter, describe
from gpulb.connection import broker_errors, connect
from gpulb.errors import GpulbError, ResultTimeout
from gpulb.models import BatchStatus
from gpulb.records import read_served_models
from gpulb.settings import Settings

if TYPE_CHECKING:  # the producer is imported only by the commands that use it: workers need not load it
    from producer import BatchHandle

POLL_S = 0.5
SERVED_CHECK_S = 2.0  # how often a follower re-reads which models live workers serve
EXIT_INTERRUPTED = 130
RESULTS_HELP = (
    "write the output file of a finished batch; an unfinished one is an error at once (exit 1) that "
    "points to `gpulb batch wait ID -o FILE`, unless --timeout S, which waits up to S seconds"
)


class ServedModelCheck:
    """Whether a live worker serves ``model``, read again at most every ``SERVED_CHECK_S`` seconds."""

    def __init__(self, conn: redis.Redis, model: str, redis_url: str) -> None:
        self.conn, self.model, self.redis_url = conn, model, redis_url
        self._checked_at: float | None = None
        self._served = True

    def warning(self) -> str | None:
        """A warning for the user while no live worker serves the model, else None."""
        now = time.monotonic()
        if self._checked_at is None or now - self._checked_at >= SERVED_CHECK_S:
            with broker_errors(self.redis_url):
                self._served = self.model in read_served_models(self.conn)
            self._checked_at = now
        return None if self._served else f"warning: no live worker serves model {self.model!r}"


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    submit = sub.add_parser(
        "submit",
        help="submit an OpenAI Batch JSONL file and write the OpenAI Batch output file",
        description="Check every line of an OpenAI Batch input file (custom_id, method, url, body), enqueue "
        "them as one batch, show progress, and write the output file (custom_id, response.body, error) "
        "once every request is answered. Bad lines are reported by number and nothing is enqueued.",
        epilog="Example: gpulb submit prompts.jsonl -o answers.jsonl    "
        "Detached: ID=$(gpulb submit prompts.jsonl --detach); gpulb batch wait $ID -o answers.jsonl    "
        "While no live worker serves the file's model, submit warns (and the progress line says so); with "
        "--fail-fast it submits nothing and exits with 1 instead.",
        parents=parents,
    )
    submit.add_argument("file", type=Path, help="input JSONL, one request per line")
    submit.add_argument("-o", "--output", type=Path, help="output JSONL (default: FILE with .out.jsonl)")
    submit.add_argument("--detach", action="store_true", help="print the batch id and return at once")
    submit.add_argument("--priority", type=int, default=0, help="-255..255; higher runs first (default 0)")
    submit.add_argument("--max-tokens", type=int, default=None,
                        help="for lines whose body has no max_tokens (default: GPULB_PRODUCER__DEFAULT_MAX_TOKENS, "
                             "1024, as the gateway)")  # fmt: skip
    submit.add_argument("--timeout", type=float, help="seconds to wait before giving up (the batch keeps running)")
    submit.add_argument("--fail-fast", action="store_true",
                        help="submit nothing and exit with 1 when no live worker serves the model")  # fmt: skip
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="kept with the batch")
    batch = sub.add_parser("batch", help="status, wait, results, cancel or list batches by id", parents=parents)
    verbs = batch.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (("status", "counts and state"), ("wait", "wait with a progress bar, then write results"),
                       ("results", RESULTS_HELP), ("cancel", "cancel what has not started")):  # fmt: skip
        parser = verbs.add_parser(verb, help=text, description=text, parents=parents)
        parser.add_argument("batch_id")
        parser.add_argument("--json", action="store_true", help="machine-readable status")
        if verb in ("wait", "results"):
            parser.add_argument("-o", "--output", type=Path, help="output JSONL (wait: optional)")
            parser.add_argument("--timeout", type=float, help="seconds to wait (results: without it, no wait)")
    listing = verbs.add_parser("list", help="the newest batches", parents=parents)
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")


def run_submit(args: argparse.Namespace, settings: Settings) -> int:
    from producer import Client
    from producer.batchfile import read_batch_file

    default_max_tokens = settings.producer.default_max_tokens if args.max_tokens is None else args.max_tokens
    batch_file = read_batch_file(args.file, default_max_tokens=default_max_tokens, limits=settings.producer)
    metadata = {"input_file": args.file.name, "endpoint": batch_file.endpoint, **_pairs(args.metadata)}
    output = args.output or args.file.with_suffix(".out.jsonl")
    served = ServedModelCheck(connect(settings), batch_file.model, settings.redis_url)
    with Client(settings.redis_url, settings=settings) as client:
        _check_served(served, fail_fast=args.fail_fast)
        handle = client.submit_batch(batch_file.checked, model=batch_file.model, priority=args.priority,
                                     metadata=metadata)  # fmt: skip
        if args.detach:
            print(handle.id)
            print(f"gpulb: submitted {handle.total:,} requests as batch {handle.id}; "
                  f"follow it with: gpulb batch wait {handle.id} -o {output}", file=sys.stderr)  # fmt: skip
            return 0
        print(f"gpulb: batch {handle.id}: {handle.total:,} requests for {batch_file.model}", file=sys.stderr)
        return _follow_and_write(handle, output, args.timeout, served=served)


def _check_served(served: ServedModelCheck, *, fail_fast: bool) -> None:
    warning = served.warning()
    if warning is None:
        return
    start = f"start one: gpulb worker --model {served.model} (or gpulb up --model {served.model})"
    if fail_fast:
        raise GpulbError(f"no live worker serves model {served.model!r}; nothing was submitted ({start})")
    print(f"gpulb: {warning}: the batch waits until one does ({start}; --fail-fast: refuse instead)",
          file=sys.stderr)  # fmt: skip


def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    from producer import Client

    with Client(settings.redis_url, settings=settings) as client:
        if args.verb == "list":
            return _print_statuses(client.list_batches(args.limit), as_json=args.json)
        handle = client.get_batch(args.batch_id)
        if args.verb == "status":
            return _print_statuses([handle.status()], as_json=args.json)
        if args.verb == "cancel":
            return _print_statuses([handle.cancel()], as_json=args.json)
        if args.verb == "wait":
            served = ServedModelCheck(connect(settings), handle.status().model, settings.redis_url)
            return _follow_and_write(handle, args.output, args.timeout, served=served)
        if not args.output:
            raise SystemExit("gpulb batch results: -o/--output is required")
        _refuse_or_announce_wait(handle, args.output, args.timeout)
        return _follow_and_write(handle, args.output, args.timeout, quiet=True)


def _refuse_or_announce_wait(handle: BatchHandle, output: Path, timeout: float | None) -> None:
    """``batch results`` does not block unasked: an unfinished batch is an error, unless --timeout allows a wait."""
    status = handle.status()
    if status.finished:
        return
    counts = f"{status.pending:,} pending, {status.running:,} running, {describe(status)}"
    if timeout is None:
        raise GpulbError(f"batch {handle.id} is {status.state.value} ({counts}): not every result is in yet. "
                         f"Wait for it and write the file: gpulb batch wait {handle.id} -o {output}")  # fmt: skip
    print(f"gpulb: waiting up to {timeout:g} s for batch {handle.id} to finish ({counts})", file=sys.stderr)


def _follow_and_write(handle: BatchHandle, output: Path | None, timeout: float | None, *, quiet: bool = False,
                      served: ServedModelCheck | None = None) -> int:  # fmt: skip
    try:
        status = follow(handle, None if quiet else ProgressReporter(), timeout, served)
    except KeyboardInterrupt:
        print(f"\ngpulb: stopped watching; batch {handle.id} keeps running. Resume: gpulb batch wait {handle.id}"
              + (f" -o {output}" if output else ""), file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    if output is not None:
        written = write_results(handle, status, output)
        print(f"gpulb: wrote {written:,} lines to {output} ({status.completed:,} completed, {status.failed:,} "
              f"failed, {status.cancelled:,} cancelled)", file=sys.stderr)  # fmt: skip
    return 0


def follow(
    handle: BatchHandle,
    reporter: ProgressReporter | None,
    timeout: float | None,
    served: ServedModelCheck | None = None,
) -> BatchStatus:
    """Poll until the batch finishes, reporting progress (with a warning while ``served`` finds no live worker for
    the model); raises ResultTimeout after ``timeout`` s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            status = handle.status()
            if reporter is not None:
                reporter.update(status, note=None if served is None or status.finished else served.warning())
            if status.finished:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ResultTimeout(f"batch {handle.id} not finished after {timeout} s ({describe(status)}); "
                                    f"it keeps running: gpulb batch wait {handle.id}")  # fmt: skip
            time.sleep(POLL_S)
    finally:
        if reporter is not None:
            reporter.close()


def write_results(handle: BatchHandle, status: BatchStatus, output: Path) -> int:
    from producer.batchfile import COMPLETIONS, output_line, write_output

    endpoint = status.metadata.get("endpoint", COMPLETIONS)
    results = handle.results(timeout=0)
    lines = (output_line(r, model=status.model, endpoint=endpoint, batch_id=handle.id) for r in results)
    return write_output(output, lines)


def _print_statuses(statuses: list[BatchStatus], *, as_json: bool) -> int:
    if as_json:
        payload = [s.model_dump(mode="json") for s in statuses]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        return 0
    if not statuses:
        print("(no batches)")
    for s in statuses:
        age = time.time() - s.submitted_at
        print(f"{s.batch_id}  {s.state.value:<9}  {s.model:<24}  {describe(s)}  "
              f"submitted {age:,.0f}s ago")  # fmt: skip
    return 0


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"gpulb submit: --metadata {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs
