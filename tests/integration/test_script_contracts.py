"""Each script's contract, through its method of the facade, on the real redis-server: the exact reply and every key
it leaves. One batch (two requests, one ingress member) goes through publish, dispatch, start, then record, requeue or
cancel."""

from __future__ import annotations

import pytest
import redis

from gpulb import keys
from gpulb.errors import GarbageInRedis
from gpulb.models import Result
from gpulb.scripts import (
    CancelledRun,
    DispatchReply,
    RecordedRequest,
    RecordReply,
    RequeueReply,
    Scripts,
    StartedBatch,
    StartedRequest,
    StartRequest,
)

BATCH, MODEL, WORKER, MB = "b1", "m", "w1", "mb1"
PAYLOADS = {"0": '{"prompt":"a","custom_id":"x"}', "1": '{"prompt":"b"}'}
REQUESTS = [StartRequest(0, "b1:0:0::5"), StartRequest(1, "b1:1:0::7")]
BATCH_RECORD = {"model": MODEL, "total": "2", "submitted_at": "1000.5", "running": "0", "completed": "0",
                "failed": "0", "cancelled": "0", "state": "pending", "ttl_s": "60"}  # fmt: skip

PUBLISHED: dict[str, object] = {
    keys.wakeup_key(): ["b:b1"],
    keys.batch_key(BATCH): BATCH_RECORD,
    keys.batch_requests_key(BATCH): PAYLOADS,
    keys.batches_key(): [(BATCH, 1000.5)],
    keys.models_key(): {MODEL},
    keys.ingress_key(MODEL): [("b1:0:0::5,7", 100.0)],
    keys.ingress_requests_key(MODEL): "2",
    keys.ingress_tokens_key(MODEL): "12",
}
LOAD = {"state": "idle", "model": MODEL}
MICROBATCH = {"worker": WORKER, "model": MODEL, "tokens": "12", "count": "2", "entries": "b1:0:0::5 b1:1:0::7",
              "scores": "100x2", "created_at": "1001.0"}  # fmt: skip
DISPATCHED: dict[str, object] = {
    **{k: v for k, v in PUBLISHED.items() if k != keys.ingress_key(MODEL)},
    keys.load_key(WORKER): LOAD,
    keys.microbatch_key(MB): MICROBATCH,
    keys.credit_key(WORKER): {"batches": "1", "tokens": "12", "requests": "2"},
    keys.inflight_key(WORKER): {MB},
    keys.ingress_requests_key(MODEL): "0",
    keys.ingress_tokens_key(MODEL): "0",
    keys.rq_job_key(MB): {"status": "queued"},
    keys.rq_queue_key(WORKER): [MB],
    keys.rq_queues_key(): {keys.rq_queue_key(WORKER)},
}
STARTED: dict[str, object] = {
    **DISPATCHED,
    keys.batch_key(BATCH): {**BATCH_RECORD, "running": "2", "state": "running"},
    keys.microbatch_key(MB): {**MICROBATCH, "ran": "b1:0:0::5 b1:1:0::7"},
}
SETTLED_CREDIT = {"batches": "0", "tokens": "0", "requests": "0"}


def everything(conn: redis.Redis) -> dict[str, object]:
    """Every key and what it holds."""
    read = {
        "hash": conn.hgetall, "set": conn.smembers, "string": conn.get,
        "list": lambda k: conn.lrange(k, 0, -1), "zset": lambda k: conn.zrange(k, 0, -1, withscores=True),
    }  # fmt: skip
    return {key: read[conn.type(key)](key) for key in conn.keys("*")}


@pytest.fixture
def scripts(conn: redis.Redis) -> Scripts:
    return Scripts(conn)


def publish(scripts: Scripts, conn: redis.Redis) -> bool:
    conn.hset(keys.batch_requests_key(BATCH), mapping=PAYLOADS)
    conn.expire(keys.batch_requests_key(BATCH), 3600)
    record: dict[str, str | int | float] = {"model": MODEL, "total": 2, "submitted_at": 1000.5, "running": 0,
                                            "completed": 0, "failed": 0, "cancelled": 0, "state": "pending",
                                            "ttl_s": 60}  # fmt: skip
    return scripts.publish(batch_id=BATCH, model=MODEL, record=record, runs=[("b1:0:0::5,7", 100)], tokens=12,
                           requests=2, listed=True)  # fmt: skip


def dispatch(scripts: Scripts, conn: redis.Redis) -> DispatchReply:
    conn.hset(keys.load_key(WORKER), mapping=LOAD)
    return scripts.dispatch(
        microbatch_id=MB, worker_id=WORKER, model=MODEL, max_requests=8, token_budget=100, max_outstanding=4,
        now=1001.0, respect_affinity=False, affinity_scan=0, free_owners=(), owners_ttl_s=3600, credit_in_slots=False,
        longest_first=False, rq_job_fields=["status", "queued"],
    )  # fmt: skip


@pytest.fixture
def started(scripts: Scripts, conn: redis.Redis) -> None:
    publish(scripts, conn)
    dispatch(scripts, conn)
    scripts.start(microbatch_id=MB, batches={BATCH: REQUESTS})


def result(index: int, **fields: object) -> Result:
    base: dict[str, object] = {"request_id": f"b1-{index}", "index": index, "text": "ok", "output_tokens": 3 + index,
                               "finish_reason": "stop", "worker": WORKER, "submitted_at": 1000.5, "started_at": 1001.5,
                               "finished_at": 1002.5}  # fmt: skip
    return Result.model_validate({**base, **fields})


def test_publish_makes_the_staged_batch_visible_once(scripts: Scripts, conn: redis.Redis) -> None:
    assert publish(scripts, conn) is True
    assert everything(conn) == PUBLISHED
    assert conn.ttl(keys.batch_requests_key(BATCH)) == -1  # the staging no longer expires
    assert publish(scripts, conn) is False
    assert everything(conn) == PUBLISHED


def test_dispatch_cuts_a_microbatch_and_enqueues_its_rq_job(scripts: Scripts, conn: redis.Redis) -> None:
    publish(scripts, conn)
    assert dispatch(scripts, conn) == DispatchReply(1, 2, 12, -1, 0, "", "")
    assert everything(conn) == DISPATCHED


def test_dispatch_refuses_garbage_with_nothing_written(scripts: Scripts, conn: redis.Redis) -> None:
    publish(scripts, conn)
    conn.set(keys.inflight_key(WORKER), "not a set")
    before = everything(conn)
    with pytest.raises(GarbageInRedis) as refused:
        dispatch(scripts, conn)
    assert (refused.value.key, refused.value.what) == (keys.inflight_key(WORKER), "is a string, not a set")
    assert everything(conn) == {**before, keys.load_key(WORKER): LOAD}


def test_start_reads_the_payloads_and_counts_the_requests_running(scripts: Scripts, conn: redis.Redis) -> None:
    publish(scripts, conn)
    dispatch(scripts, conn)
    reply = scripts.start(microbatch_id=MB, batches={BATCH: REQUESTS})
    assert reply == [StartedBatch(1000.5, False, [StartedRequest(False, True, PAYLOADS["0"]),
                                                  StartedRequest(False, True, PAYLOADS["1"])])]  # fmt: skip
    assert everything(conn) == STARTED
    assert scripts.start(microbatch_id="gone", batches={BATCH: REQUESTS}) is None  # taken back: do not run


@pytest.mark.usefixtures("started")
def test_record_writes_the_results_and_settles_the_batch_and_the_credit(scripts: Scripts, conn: redis.Redis) -> None:
    results = [result(0, custom_id="x"), result(1)]
    recorded = [
        RecordedRequest(r.index, s.member, r, 5 + 2 * r.index, True) for r, s in zip(results, REQUESTS, strict=True)
    ]
    call = scripts.record_call(microbatch_id=MB, worker_id=WORKER, model=MODEL, now=1003.0, final=True, wake_at=None,
                               batches={BATCH: recorded})  # fmt: skip
    assert scripts.run(call) == RecordReply(2, 0)
    expected = {
        **{k: v for k, v in STARTED.items() if k not in (keys.microbatch_key(MB), keys.inflight_key(WORKER))},
        keys.batch_key(BATCH): {**BATCH_RECORD, "completed": "2", "state": "completed", "finished_at": "1003.0"},
        keys.batch_results_key(BATCH): {str(r.index): r.model_dump_json() for r in results},
        keys.output_lengths_key(MODEL): {"count": "2", "tokens": "7"},
        keys.credit_key(WORKER): SETTLED_CREDIT,
        keys.wakeup_key(): ["b:b1", "w:w1"],
    }
    del expected[keys.batch_requests_key(BATCH)]  # every payload went with its result
    assert everything(conn) == expected
    assert 0 < conn.ttl(keys.batch_key(BATCH)) <= 60 and 0 < conn.ttl(keys.batch_results_key(BATCH)) <= 60


@pytest.mark.usefixtures("started")
def test_a_pipelined_call_that_meets_noscript_runs_again_loaded(scripts: Scripts, conn: redis.Redis) -> None:
    conn.script_flush()
    pipe = conn.pipeline(transaction=True)
    call = scripts.queue(pipe, scripts.record_call(
        microbatch_id=MB, worker_id=WORKER, model=MODEL, now=1003.0, final=False, wake_at=None,
        batches={BATCH: [RecordedRequest(0, REQUESTS[0].member, result(0), 5, True)]},
    ))  # fmt: skip
    assert scripts.reply(call, pipe.execute(raise_on_error=False)[0]) == RecordReply(1, 0)
    assert call.reran
    assert conn.hget(keys.batch_results_key(BATCH), "0") == result(0).model_dump_json()


@pytest.mark.usefixtures("started")
def test_requeue_puts_started_requests_back_with_one_more_attempt(scripts: Scripts, conn: redis.Redis) -> None:
    reply = scripts.requeue(microbatch_id=MB, worker_id=WORKER, model=MODEL, batch_ids=[BATCH], only_if_queued=False,
                            now=1002.0, max_attempts=2, reason="gone")  # fmt: skip
    assert reply == RequeueReply(2, 0, True)
    gone = (keys.microbatch_key(MB), keys.inflight_key(WORKER), keys.rq_job_key(MB), keys.rq_queue_key(WORKER))
    assert everything(conn) == {
        **{k: v for k, v in STARTED.items() if k not in gone},
        keys.batch_key(BATCH): {**BATCH_RECORD, "state": "running"},
        keys.ingress_key(MODEL): [("b1:0:1::5", 100.0), ("b1:1:1::7", 101.0)],
        keys.ingress_requests_key(MODEL): "2",
        keys.ingress_tokens_key(MODEL): "12",
        keys.credit_key(WORKER): SETTLED_CREDIT,
        keys.wakeup_key(): ["b:b1", "w:w1"],
    }


@pytest.mark.usefixtures("started")
def test_requeue_at_max_attempts_records_dead_letters(scripts: Scripts, conn: redis.Redis) -> None:
    reply = scripts.requeue(microbatch_id=MB, worker_id=WORKER, model=MODEL, batch_ids=[BATCH], only_if_queued=False,
                            now=1002.0, max_attempts=1, reason="gone")  # fmt: skip
    assert reply == RequeueReply(0, 2, True)
    results = {int(i): Result.model_validate_json(r) for i, r in conn.hgetall(keys.batch_results_key(BATCH)).items()}
    assert results == {
        i: Result(request_id=f"b1-{i}", index=i, custom_id="x" if i == 0 else None, text="", output_tokens=0,
                  worker=WORKER, error="gone", attempts=1, submitted_at=1000.5, started_at=1002.0, finished_at=1002.0)
        for i in (0, 1)
    }  # fmt: skip
    assert conn.hgetall(keys.batch_key(BATCH)) == {**BATCH_RECORD, "failed": "2", "state": "completed",
                                                   "finished_at": "1002.0"}  # fmt: skip
    assert not conn.exists(keys.batch_requests_key(BATCH), keys.microbatch_key(MB), keys.ingress_key(MODEL))


def test_requeue_only_if_queued_leaves_a_started_microbatch(scripts: Scripts, conn: redis.Redis) -> None:
    publish(scripts, conn)
    dispatch(scripts, conn)
    conn.lpop(keys.rq_queue_key(WORKER))  # its RQ worker took it
    before = everything(conn)
    reply = scripts.requeue(microbatch_id=MB, worker_id=WORKER, model=MODEL, batch_ids=[BATCH], only_if_queued=True,
                            now=1002.0, max_attempts=2, reason="gone")  # fmt: skip
    assert reply == RequeueReply(0, 0, False)
    assert everything(conn) == before


def test_cancel_records_what_waits_in_the_ingress_as_cancelled(scripts: Scripts, conn: redis.Redis) -> None:
    publish(scripts, conn)
    cancelled = [result(i, text="", output_tokens=0, finish_reason=None, worker="", error="cancelled", cancelled=True,
                        attempts=0, started_at=1002.0, finished_at=1002.0) for i in (0, 1)]  # fmt: skip
    assert scripts.cancel(batch_id=BATCH, model=MODEL, now=1002.0, runs=[CancelledRun("b1:0:0::5,7", cancelled)]) == 2
    results = {int(i): Result.model_validate_json(r) for i, r in conn.hgetall(keys.batch_results_key(BATCH)).items()}
    assert results == {0: cancelled[0].model_copy(update={"custom_id": "x"}), 1: cancelled[1]}
    assert everything(conn) == {
        **{k: v for k, v in PUBLISHED.items() if k not in (keys.ingress_key(MODEL), keys.batch_requests_key(BATCH))},
        keys.batch_key(BATCH): {
            **BATCH_RECORD,
            "cancelled": "2",
            "state": "cancelled",
            "cancelled_at": "1002.0",
            "finished_at": "1002.0",
        },
        keys.batch_results_key(BATCH): conn.hgetall(keys.batch_results_key(BATCH)),
        keys.ingress_requests_key(MODEL): "0",
        keys.ingress_tokens_key(MODEL): "0",
    }
