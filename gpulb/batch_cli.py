"""``gpulb submit`` and ``gpulb batch ...``: OpenAI Batch files in and out, with a live progress bar."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpulb.errors import ResultTimeout
from gpulb.models import BatchStatus
from gpulb.progress import ProgressReporter, describe
from gpulb.settings import Settings

if TYPE_CHECKING:  # the producer is imported only by the commands that use it: workers need not load it
    from producer import BatchHandle

POLL_S = 0.5
EXIT_INTERRUPTED = 130


def add_parsers(sub: Any) -> None:
    submit = sub.add_parser(
        "submit",
        help="submit an OpenAI Batch JSONL file and write the OpenAI Batch output file",
        description="Check every line of an OpenAI Batch input file (custom_id, method, url, body), enqueue "
        "them as one batch, show progress, and write the output file (custom_id, response.body, error) "
        "once every request is answered. Bad lines are reported by number and nothing is enqueued.",
        epilog="Example: gpulb submit prompts.jsonl -o answers.jsonl    "
        "Detached: ID=$(gpulb submit prompts.jsonl --detach); gpulb batch wait $ID -o answers.jsonl",
    )
    submit.add_argument("file", type=Path, help="input JSONL, one request per line")
    submit.add_argument("-o", "--output", type=Path, help="output JSONL (default: FILE with .out.jsonl)")
    submit.add_argument("--detach", action="store_true", help="print the batch id and return at once")
    submit.add_argument("--priority", type=int, default=0, help="-255..255; higher runs first (default 0)")
    submit.add_argument("--max-tokens", type=int, default=256, help="for lines whose body has no max_tokens")
    submit.add_argument("--timeout", type=float, help="seconds to wait before giving up (the batch keeps running)")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="kept with the batch")
    batch = sub.add_parser("batch", help="status, wait, results, cancel or list batches by id")
    verbs = batch.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (("status", "counts and state"), ("wait", "wait with a progress bar, then write results"),
                       ("results", "write the output file of a finished batch"),
                       ("cancel", "cancel what has not started")):  # fmt: skip
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("batch_id")
        parser.add_argument("--json", action="store_true", help="machine-readable status")
        if verb in ("wait", "results"):
            parser.add_argument("-o", "--output", type=Path, help="output JSONL (wait: optional)")
            parser.add_argument("--timeout", type=float, help="seconds to wait")
    listing = verbs.add_parser("list", help="the newest batches")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")


def run_submit(args: argparse.Namespace, settings: Settings) -> int:
    from producer import Client
    from producer.batchfile import read_batch_file

    batch_file = read_batch_file(args.file, default_max_tokens=args.max_tokens, limits=settings.producer)
    metadata = {"input_file": args.file.name, "endpoint": batch_file.endpoint, **_pairs(args.metadata)}
    output = args.output or args.file.with_suffix(".out.jsonl")
    with Client(settings.redis_url, settings=settings) as client:
        handle = client.submit_batch(batch_file.requests, model=batch_file.model, priority=args.priority,
                                     metadata=metadata)  # fmt: skip
        if args.detach:
            print(handle.id)
            print(f"gpulb: submitted {handle.total:,} requests as batch {handle.id}; "
                  f"follow it with: gpulb batch wait {handle.id} -o {output}", file=sys.stderr)  # fmt: skip
            return 0
        print(f"gpulb: batch {handle.id}: {handle.total:,} requests for {batch_file.model}", file=sys.stderr)
        return _follow_and_write(handle, output, args.timeout)


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
            return _follow_and_write(handle, args.output, args.timeout)
        if not args.output:
            raise SystemExit("gpulb batch results: -o/--output is required")
        return _follow_and_write(handle, args.output, args.timeout, quiet=True)


def _follow_and_write(handle: BatchHandle, output: Path | None, timeout: float | None, *, quiet: bool = False) -> int:
    try:
        status = follow(handle, None if quiet else ProgressReporter(), timeout)
    except KeyboardInterrupt:
        print(f"\ngpulb: stopped watching; batch {handle.id} keeps running. Resume: gpulb batch wait {handle.id}"
              + (f" -o {output}" if output else ""), file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    if output is not None:
        written = write_results(handle, status, output)
        print(f"gpulb: wrote {written:,} lines to {output} ({status.completed:,} completed, {status.failed:,} "
              f"failed, {status.cancelled:,} cancelled)", file=sys.stderr)  # fmt: skip
    return 0


def follow(handle: BatchHandle, reporter: ProgressReporter | None, timeout: float | None) -> BatchStatus:
    """Poll until the batch finishes, reporting progress; raises ResultTimeout after ``timeout`` s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            status = handle.status()
            if reporter is not None:
                reporter.update(status)
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
