"""The core's readers of Redis records (fakeredis): what each gives for a record, for none, and for garbage."""

from __future__ import annotations

import fakeredis
import pytest
import redis

from gpulb import keys
from gpulb.errors import BadPayload, BatchNotFound
from gpulb.models import BatchState, Result, WorkerLoad, WorkerState
from gpulb.records import (
    load_from_reply,
    queue_load_reads,
    read_batch_status,
    read_batch_statuses,
    read_result,
    read_results,
)


@pytest.fixture
def conn() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


def load_replies(conn: fakeredis.FakeRedis, worker_ids: list[str]) -> list[object]:
    pipe = conn.pipeline(transaction=False)
    queue_load_reads(pipe, worker_ids)
    return pipe.execute(raise_on_error=False)


def batch_record(**fields: object) -> dict[str, object]:
    return {"model": "m", "total": 3, "submitted_at": 1.0, "state": "running", "running": 1, "completed": 1} | fields


class TestWorkerLoad:
    def test_a_load_key_reads_back_as_the_load_written_and_no_key_as_none(self, conn: fakeredis.FakeRedis) -> None:
        load = WorkerLoad(worker_id="w", model="m", backend="simulated", state=WorkerState.BUSY, capacity=8, slots=4)
        conn.hset(keys.load_key("w"), mapping=load.to_hash())  # type: ignore[arg-type]
        assert [load_from_reply(reply) for reply in load_replies(conn, ["w", "gone"])] == [load, None]  # type: ignore[arg-type]

    def test_garbage_and_a_key_of_another_type_are_bad_payloads(self, conn: fakeredis.FakeRedis) -> None:
        conn.hset(keys.load_key("garbage"), mapping={"worker_id": "w", "state": "busy", "capacity": "lots"})
        conn.set(keys.load_key("string"), "not a hash")
        for reply in load_replies(conn, ["garbage", "string"]):
            with pytest.raises(BadPayload, match="malformed load key"):
                load_from_reply(reply)  # type: ignore[arg-type]

    def test_an_error_other_than_the_wrong_type_is_raised_as_it_is(self) -> None:
        with pytest.raises(redis.ResponseError, match="LOADING"):
            load_from_reply(redis.ResponseError("LOADING Redis is loading the dataset in memory"))


class TestBatchRecord:
    def test_the_record_reads_as_counts_with_what_is_pending(self, conn: fakeredis.FakeRedis) -> None:
        conn.hset(keys.batch_key("b1"), mapping=batch_record())  # type: ignore[arg-type]
        status = read_batch_status(conn, "b1")
        assert (status.total, status.pending, status.running, status.done, status.state) == (
            3, 1, 1, 1, BatchState.RUNNING)  # fmt: skip

    def test_no_record_is_not_found_and_garbage_a_bad_payload(self, conn: fakeredis.FakeRedis) -> None:
        conn.hset(keys.batch_key("bad"), mapping=batch_record(total="many"))  # type: ignore[arg-type]
        with pytest.raises(BatchNotFound):
            read_batch_status(conn, "gone")
        with pytest.raises(BadPayload, match="batch record bad is malformed"):
            read_batch_status(conn, "bad")

    def test_many_at_once_leave_out_garbage_and_name_the_expired(self, conn: fakeredis.FakeRedis) -> None:
        conn.hset(keys.batch_key("b1"), mapping=batch_record())  # type: ignore[arg-type]
        conn.hset(keys.batch_key("bad"), mapping=batch_record(submitted_at="yesterday"))  # type: ignore[arg-type]
        statuses, expired = read_batch_statuses(conn, ["b1", "bad", "gone"])
        assert ([s.batch_id for s in statuses], expired) == (["b1"], ["gone"])


class TestResults:
    def test_results_read_back_in_order_and_one_not_yet_recorded_is_none(self, conn: fakeredis.FakeRedis) -> None:
        results = [Result(request_id=f"b-{i}", index=i, text=str(i), output_tokens=1, worker="w", submitted_at=1.0,
                          started_at=1.0, finished_at=2.0) for i in range(2)]  # fmt: skip
        for result in results:
            conn.hset(keys.batch_results_key("b"), str(result.index), result.model_dump_json())
        assert read_results(conn, "b", 2) == results
        assert (read_result(conn, "b", 1), read_result(conn, "b", 2)) == (results[1], None)
        with pytest.raises(BatchNotFound, match="1 of 3 results are missing"):
            read_results(conn, "b", 3)
