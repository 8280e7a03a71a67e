"""Following a streamed request's pieces (fakeredis): one run only, the result's rest, a run that differs."""

from __future__ import annotations

import fakeredis
import pytest

from gpulb import keys
from gpulb.errors import StreamBroken
from gpulb.models import Result
from producer.streaming import follow_text


def result(text: str, **extra: object) -> Result:
    fields = {"request_id": "b-0", "index": 0, "text": text, "output_tokens": 3, "worker": "w", "submitted_at": 1.0,
              "started_at": 1.0, "finished_at": 2.0, **extra}  # fmt: skip
    return Result.model_validate(fields)


def streamed(conn: fakeredis.FakeRedis, pieces: list[tuple[str, str]], final: Result) -> None:
    for run, text in pieces:
        conn.xadd(keys.text_stream_key("b", 0), {"r": run, "t": text})
    conn.hset(keys.batch_results_key("b"), "0", final.model_dump_json())


@pytest.fixture
def conn() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


class TestFollowText:
    def test_the_first_run_pieces_then_what_the_result_adds_then_the_result(self, conn: fakeredis.FakeRedis) -> None:
        final = result("one two three")
        streamed(conn, [("w:0:1", "one"), ("w:0:2", "uno"), ("w:0:1", " two")], final)  # a retry's pieces: skipped
        assert list(follow_text(conn, "b", 0, timeout_s=5)) == ["one", " two", " three", final]

    def test_an_answer_that_differs_from_what_was_sent_is_refused(self, conn: fakeredis.FakeRedis) -> None:
        streamed(conn, [("w:0:1", "one")], result("uno dos"))  # its first run died; another answered differently
        reader = follow_text(conn, "b", 0, timeout_s=5)
        assert next(reader) == "one"
        with pytest.raises(StreamBroken, match="run again after 3 characters"):
            next(reader)

    def test_a_failed_request_ends_with_its_result_and_no_rest(self, conn: fakeredis.FakeRedis) -> None:
        failed = result("", error="engine died", output_tokens=0)
        streamed(conn, [("w:0:1", "one")], failed)
        assert list(follow_text(conn, "b", 0, timeout_s=5)) == ["one", failed]
