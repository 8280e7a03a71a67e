"""Key schema, wire models, settings and the simulated backend."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gpulb import keys
from gpulb.cli.main import build_parser, main, settings_from_args
from gpulb.connection import connect, redact_url
from gpulb.errors import BadPayload, ConfigError
from gpulb.models import RequestSpec, WorkerLoad, WorkerState, request_cost
from gpulb.settings import RedisSettings, Settings
from worker.backends.simulated import LinearSimulatedBackend, echo_text


class TestKeySchema:
    def test_every_key_is_pinned(self) -> None:
        assert keys.ingress_key("llama-3") == "gpulb:{llama-3}:ingress"
        assert keys.ingress_tokens_key("llama-3") == "gpulb:{llama-3}:ingress_tokens"
        assert keys.batch_key("b1") == "gpulb:batch:b1"
        assert keys.batches_key() == "gpulb:batches"
        assert keys.batch_requests_key("b1") == "gpulb:batch:b1:requests"
        assert keys.batch_results_key("b1") == "gpulb:batch:b1:results"
        assert keys.batch_events_channel("b1") == "gpulb:batch:b1:events"
        assert keys.load_key("w1") == "gpulb:worker:w1:load"
        assert keys.credit_key("w1") == "gpulb:worker:w1:credit"
        assert keys.inflight_key("w1") == "gpulb:worker:w1:inflight"
        assert keys.microbatch_key("mb-1") == "gpulb:mb:mb-1"
        assert (keys.workers_key(), keys.models_key(), keys.seq_key()) == ("gpulb:workers", "gpulb:models", "gpulb:seq")
        assert keys.wakeup_key() == "gpulb:balancer:wakeup"
        assert (keys.rq_queue_key("w1"), keys.rq_job_key("mb-1"), keys.rq_queues_key()) == (
            "rq:queue:w1", "rq:job:mb-1", "rq:queues",
        )  # fmt: skip
        assert keys.JOB_FUNC == "worker.jobs.run_microbatch"

    def test_ingress_member_round_trip(self) -> None:
        member = keys.ingress_member("ab12", 7, [300, 12, 5], attempt=2, affinity="f00d")
        assert member == "ab12:7:2:f00d:300,12,5"
        parsed = keys.parse_ingress_member(member)
        assert parsed == ("ab12", 7, 2, "f00d", (300, 12, 5)) and str(parsed) == member
        assert [str(r) for r in parsed.requests()] == ["ab12:7:2:f00d:300", "ab12:8:2:f00d:12", "ab12:9:2:f00d:5"]
        assert keys.parse_ingress_member("ab12:7:0::300").affinity == ""
        for garbage in ("garbage", "a:1:2:3", "a:b:2::3", "a b:1:2::3", "a:1:2:x y:3", "a:1:2::", "a:1:2::3,x"):
            with pytest.raises(ValueError):
                keys.parse_ingress_member(garbage)

    def test_affinity_keys_come_from_the_session_or_a_long_shared_prefix(self) -> None:
        from gpulb.models import PREFIX_AFFINITY_BYTES

        shared = "s" * PREFIX_AFFINITY_BYTES
        a, b = RequestSpec(prompt=shared + "one", max_tokens=1), RequestSpec(prompt=shared + "two", max_tokens=1)
        assert a.affinity_key() == b.affinity_key() != ""
        assert RequestSpec(prompt="short", max_tokens=1).affinity_key() == ""
        chat = RequestSpec(prompt="short", max_tokens=1, session="user-42")
        assert chat.affinity_key() != "" and chat.affinity_key() != a.affinity_key()
        assert "session" not in chat.sampling()

    def test_scores_order_by_priority_then_submission(self) -> None:
        scores = [
            keys.ingress_score(0, 5),
            keys.ingress_score(10, 900),
            keys.ingress_score(0, 4),
            keys.ingress_score(-1, 1),
        ]
        order = sorted(range(4), key=lambda i: scores[i])
        assert order == [1, 2, 0, 3]
        extreme = keys.ingress_score(keys.MAX_ABS_PRIORITY, keys.PRIORITY_SPAN - 1)
        assert float(extreme) == extreme  # exact as a Redis zset score (a double)


class TestModels:
    def test_request_cost_counts_output_and_a_little_prompt(self) -> None:
        assert request_cost(0, 16) == 16
        assert request_cost(320, 16) == 26
        assert RequestSpec(prompt="x" * 64, max_tokens=5).cost_tokens() == 7

    def test_sampling_keeps_only_what_was_set(self) -> None:
        spec = RequestSpec(prompt="p", max_tokens=3, temperature=0.2, stop=["\n"])
        assert spec.sampling() == {"temperature": 0.2, "stop": ["\n"]}

    def test_load_key_round_trips_as_flat_strings(self) -> None:
        load = WorkerLoad(worker_id="w", model="m", backend="simulated", state=WorkerState.BUSY, capacity=8,
                          running=3, tokens_per_s=1234.5, ts=100.0)  # fmt: skip
        flat = load.to_hash()
        assert all(isinstance(v, str) for v in flat.values())
        assert flat["v"] == "2" and flat["state"] == "busy"
        assert WorkerLoad.from_hash(flat) == load

    def test_garbage_load_key_is_a_bad_payload(self) -> None:
        with pytest.raises(BadPayload, match="malformed load key"):
            WorkerLoad.from_hash({"worker_id": "w", "model": "m", "backend": "x", "state": "busy", "capacity": "lots"})


class TestSettings:
    def test_environment_reaches_nested_sections(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPULB_REDIS_URL", "redis://example:6380/2")
        monkeypatch.setenv("GPULB_WORKER__TOKENS_PER_S", "2500")
        monkeypatch.setenv("GPULB_BALANCER__BATCH_TARGET_S", "0.25")
        s = Settings(_env_file=None)  # type: ignore[call-arg]
        assert (s.redis_url, s.worker.tokens_per_s, s.balancer.batch_target_s) == ("redis://example:6380/2", 2500, 0.25)

    def test_cli_options_override_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GPULB_WORKER__TOKENS_PER_S", "2500")
        monkeypatch.setenv("GPULB_WORKER__MAX_BATCH", "7")
        args = build_parser(Settings()).parse_args(["worker", "--id", "g0", "--model", "m", "--tokens-per-s", "900"])
        s = settings_from_args(args)
        assert (s.worker.id, s.worker.model, s.worker.tokens_per_s, s.worker.max_batch) == ("g0", "m", 900.0, 7)

    def test_bad_option_value_names_the_setting(self) -> None:
        args = build_parser(Settings()).parse_args(["worker", "--id", "bad id!", "--model", "m"])
        with pytest.raises(ConfigError, match=r"worker\.id"):
            settings_from_args(args)

    @pytest.mark.parametrize("section", [{"id": "g0\n"}, {"model": "m\n"}, {"id": "g0\n", "model": "m"}])
    def test_worker_id_and_model_with_a_final_newline_are_refused(self, section: dict[str, str]) -> None:
        """Python's "$" matches before a final newline: the patterns are checked with fullmatch."""
        with pytest.raises(ValidationError, match=r"must match"):
            Settings(_env_file=None, worker=section)  # type: ignore[call-arg]

    def test_a_ca_file_with_a_plain_redis_url_is_a_clear_config_error(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """redis-py would take ssl kwargs on a plain connection and fail every command with a TypeError."""
        url, tls = "redis://:pw@127.0.0.1:1/0", RedisSettings(ssl_ca_certs="/ca.pem")
        settings = Settings(_env_file=None, redis_url=url, redis=tls)  # type: ignore[call-arg]
        with pytest.raises(ConfigError, match=r"ssl_ca_certs .* is set but the URL is redis://.*use rediss://") as info:
            connect(settings)
        assert "pw" not in str(info.value)
        connect(settings.model_copy(update={"redis_url": "rediss://127.0.0.1:1/0"}))  # TLS: fine (connects lazily)
        monkeypatch.setenv("GPULB_REDIS__SSL_CA_CERTS", "/ca.pem")
        assert main(["--redis-url", "redis://127.0.0.1:1/0", "batch", "list"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("gpulb: error: ssl_ca_certs (GPULB_REDIS__SSL_CA_CERTS) is set but the URL is redis://")
        assert err.count("\n") == 1 and "Traceback" not in err

    def test_default_worker_id_names_host_and_gpu(self) -> None:
        s = Settings(_env_file=None, worker={"gpu": 3})  # type: ignore[call-arg]
        assert s.worker.resolved_id().endswith("-gpu3")

    def test_redact_url_hides_passwords(self) -> None:
        assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
        assert redact_url("rediss://:s3cret@host/0") == "rediss://:***@host/0"
        assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


class TestThroughputMeter:
    def test_a_gpu_that_halves_its_speed_is_noticed_within_a_few_micro_batches(self) -> None:
        from worker.engine import ThroughputMeter

        meter = ThroughputMeter(alpha=0.3)
        for _ in range(10):
            meter.observe(2000, 0.5)  # 4000 tok/s
        assert meter.tokens_per_s == pytest.approx(4000)
        seen = []
        for _ in range(5):
            meter.observe(2000, 1.0)  # throttled to 2000 tok/s: each micro-batch now takes 1 s
            seen.append(meter.tokens_per_s)
        assert seen[0] < 3500  # the first slow micro-batch already moves the estimate
        assert seen[4] < 2400  # within 5 micro-batches (~5 s) it is within 20% of the new speed

    def test_the_first_measurement_replaces_the_prior(self) -> None:
        from worker.engine import ThroughputMeter

        meter = ThroughputMeter(alpha=0.3)
        meter.observe(300, 0.1)
        assert meter.tokens_per_s == pytest.approx(3000)


class TestSimulatedBackend:
    @pytest.mark.parametrize(
        ("prompt", "n", "text"),
        [("a b", 3, "a b a"), ("a b", 1, "a"), ("one", 4, "one one one one"), ("  x  y ", 2, "x y"), ("x", 0, "")],
    )
    def test_output_repeats_the_prompt_words_to_max_tokens(self, prompt: str, n: int, text: str) -> None:
        assert echo_text(prompt, n) == text

    def test_a_batch_takes_its_tokens_over_the_speed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from worker.backends.base import BackendRequest

        backend = LinearSimulatedBackend(tokens_per_s=2000)
        waited: list[float] = []
        monkeypatch.setattr(backend._stop, "wait", lambda seconds: waited.append(seconds))
        outputs = backend.generate([BackendRequest("a b", 300), BackendRequest("c", 700)])
        assert waited == [0.5]
        assert [o.output_tokens for o in outputs] == [300, 700]
        assert outputs[0].text.split()[:3] == ["a", "b", "a"] and len(outputs[1].text.split()) == 700


def test_the_dispatch_script_knows_the_priority_band_of_the_key_schema() -> None:
    from gpulb.scripts import DISPATCH

    assert f"local PRIORITY_SPAN = {keys.PRIORITY_SPAN} " in DISPATCH
