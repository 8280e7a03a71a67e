"""Plain RQ as a shared queue: N SimpleWorkers on one queue, one job per request (the baseline).

python -m bench.rq_baseline worker --url URL --queue Q --tokens-per-s R   (one process per GPU)
"""

from __future__ import annotations

import argparse
import os
import threading

import redis
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from worker.backends.simulated import echo_text

SPEED_ENV = "GPULB_BENCH_TOKENS_PER_S"
_pause = threading.Event()  # never set: an interruptible sleep


def simulated_request(prompt: str, max_tokens: int) -> str:
    """The same simulated GPU as gpulb's: ``max_tokens / speed`` seconds per request."""
    _pause.wait(max_tokens / float(os.environ[SPEED_ENV]))
    return echo_text(prompt, max_tokens)


def enqueue(conn: redis.Redis, queue_name: str, requests: list[dict[str, object]]) -> list[str]:
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    data = [Queue.prepare_data("bench.rq_baseline.simulated_request",
                               args=(r["prompt"], r["max_tokens"]), result_ttl=600) for r in requests]  # fmt: skip
    return [job.id for job in queue.enqueue_many(data)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["worker"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--tokens-per-s", type=float, required=True)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--noop", action="store_true", help="(jobs name their own function; kept for clarity)")
    args = parser.parse_args()
    os.environ[SPEED_ENV] = str(args.tokens_per_s)
    conn = redis.Redis.from_url(args.url)
    queue = Queue(args.queue, connection=conn, serializer=JSONSerializer)
    SimpleWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=args.burst, logging_level="WARNING")


if __name__ == "__main__":
    main()
