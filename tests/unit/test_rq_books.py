"""The start-up check of the installed RQ: a release that lacks what gpulb relies on fails loud, naming it."""

from __future__ import annotations

from typing import Any

import pytest
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.worker import SimpleWorker
from structlog.testing import capture_logs

from gpulb import keys, rq_books
from gpulb.errors import GpulbError, RqIncompatible
from gpulb.rq_books import Relied, check_rq
from worker.rq_worker import RELIED_ON, check_installed_rq


class TestInstalledRq:
    def test_has_everything_the_worker_and_the_balancer_rely_on(self) -> None:
        check_installed_rq()
        check_rq()

    def test_every_method_the_worker_overrides_is_in_its_contract(self) -> None:
        from worker.rq_worker import GpulbJob, GpulbWorker

        overridden = {(r.owner, r.name) for r in RELIED_ON if r.overridden}
        for ours, theirs in ((GpulbWorker, SimpleWorker), (GpulbJob, Job)):
            names = {n for n in vars(ours) if not n.startswith("__") and callable(getattr(theirs, n, None))}
            assert {(theirs, n) for n in names} <= overridden


class TestAnRqThatChanged:
    def test_a_missing_method_fails_naming_it_and_the_version(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delattr(Job, "perform")
        with pytest.raises(RqIncompatible, match=r"installed rq 9\.0\.0 .*Job\.perform is missing") as raised:
            check_rq(RELIED_ON, version="9.0.0")
        assert isinstance(raised.value, GpulbError) and "rq >=2.12,<2.13" in str(raised.value)

    def test_an_overridden_method_with_a_new_argument_fails(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """As on RQ's development branch: ``handle_job_success`` takes the execution too."""

        def handle_job_success(self: Any, job: Job, queue: Queue, started_job_registry: Any, execution: Any) -> None:
            raise AssertionError("not called")

        monkeypatch.setattr(SimpleWorker, "handle_job_success", handle_job_success)
        with pytest.raises(RqIncompatible, match=r"SimpleWorker\.handle_job_success\(.*execution.*overrides"):
            check_rq(RELIED_ON)

    def test_a_called_method_with_a_new_required_argument_fails(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def perform_job(self: Any, job: Job, queue: Queue, execution: Any) -> bool:
            raise AssertionError("not called")

        monkeypatch.setattr(SimpleWorker, "perform_job", perform_job)
        with pytest.raises(RqIncompatible, match=r"SimpleWorker\.perform_job\(.*calls \(job, queue\)"):
            check_rq(RELIED_ON)

    def test_a_called_method_with_a_new_optional_argument_passes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def remove_executions(self: Any, job: Job, pipeline: Any = None, cleanup: bool = True) -> None:
            raise AssertionError("not called")

        monkeypatch.setattr(StartedJobRegistry, "remove_executions", remove_executions)
        check_rq(RELIED_ON)

    def test_a_renamed_key_fails(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(Job, "key_for", staticmethod(lambda job_id: f"rq:jobs:{job_id}"))
        with pytest.raises(RqIncompatible, match=r"its job key is 'rq:jobs:j', gpulb writes 'rq:job:j'"):
            check_rq()

    def test_a_fake_rq_lacking_an_attribute_fails(self) -> None:
        class FakeWorker:
            def perform_job(self, job: Job, queue: Queue) -> bool:
                return True

        check_rq([Relied(FakeWorker, "perform_job", "job queue")])
        with pytest.raises(RqIncompatible, match=r"FakeWorker\.max_connection_wait_time is missing"):
            check_rq([Relied(FakeWorker, "max_connection_wait_time")])

    def test_an_untested_version_that_has_everything_only_warns(self) -> None:
        with capture_logs() as logs:
            check_rq(RELIED_ON, version="2.13.1")
            check_rq(RELIED_ON, version="2.12.4")
        assert [(e["event"], e["rq_version"]) for e in logs] == [("untested rq version: gpulb is tested with another",
                                                                  "2.13.1")]  # fmt: skip


def test_keys_name_rqs_records_as_the_installed_rq_does() -> None:
    assert keys.rq_worker_key("w") == "rq:worker:w"
    assert rq_books.SERIALIZER.dumps({"a": 1}) == b'{"a": 1}'  # type: ignore[no-untyped-call]
