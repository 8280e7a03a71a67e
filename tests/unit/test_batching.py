"""The continuous-batching engine model behind ``--backend simulated``, and the speed a worker reads off it."""

from __future__ import annotations

import statistics
import time

import pytest

from worker.backends.base import BackendRequest
from worker.backends.batching import BatchingCore, EngineShape, LengthModel
from worker.backends.simulated import SimulatedBackend
from worker.speed import EngineSpeed


def run_all(core: BatchingCore, lengths: list[int]) -> dict[int, float]:
    """Submit every request at time 0; returns when each finished (virtual seconds)."""
    for key, tokens in enumerate(lengths):
        core.submit(key, 0, tokens, 0.0)
    finished: dict[int, float] = {}
    while (at := core.next_event_s()) is not None:
        for key in core.advance(at):
            finished[key] = at
    return finished


class TestEngineShape:
    def test_a_full_engine_generates_its_tokens_per_second(self) -> None:
        shape = EngineShape(8000, slots=128)
        assert shape.tokens_per_s_at(128) == pytest.approx(8000)

    def test_throughput_grows_almost_linearly_with_the_sequences_running(self) -> None:
        shape = EngineShape(8000, slots=128)
        assert shape.tokens_per_s_at(128) / shape.tokens_per_s_at(1) == pytest.approx(32.75, rel=0.01)
        assert shape.tokens_per_s_at(16) / shape.tokens_per_s_at(8) > 1.7  # near-linear while the batch is small
        assert shape.tokens_per_s_at(128) / shape.tokens_per_s_at(64) > 1.24  # and still paying at the slot limit
        assert 1 / shape.step_s(1) == pytest.approx(3.9 * 128 / shape.full_step_s / 128, rel=0.01)  # a lone one: 3.9x

    def test_bad_shapes_are_refused(self) -> None:
        for bad in (dict(tokens_per_s=0), dict(tokens_per_s=1, slots=0), dict(tokens_per_s=1, fixed_share=2)):
            with pytest.raises(ValueError):
                EngineShape(**bad)  # type: ignore[arg-type]


class TestBatchingCore:
    def test_every_running_sequence_gains_a_token_per_step_and_stops_at_its_own_end(self) -> None:
        shape = EngineShape(1000, slots=4, prefill_share=0)
        finished = run_all(BatchingCore(shape), [10, 20, 30, 40])
        step = shape.step_s(4)
        assert finished[0] == pytest.approx(10 * step)
        # after the first ends, three run: each step is shorter
        assert finished[1] == pytest.approx(10 * step + 10 * shape.step_s(3))

    def test_requests_beyond_the_slots_wait_and_join_when_one_ends(self) -> None:
        core = BatchingCore(EngineShape(1000, slots=2, prefill_share=0))
        core.submit("a", 0, 5, 0.0)
        core.submit("b", 0, 50, 0.0)
        core.submit("c", 0, 5, 0.0)
        assert (len(core.running), len(core.waiting)) == (2, 1)
        core.advance(core.next_event_s() or 0)  # "a" ends, "c" takes its slot
        assert set(core.running) == {"b", "c"} and not core.waiting

    def test_generated_tokens_are_counted_between_events_too(self) -> None:
        shape = EngineShape(1000, slots=4, prefill_share=0)
        core = BatchingCore(shape)
        for k in range(4):
            core.submit(k, 0, 100, 0.0)
        assert core.generated_by(10.5 * shape.step_s(4)) == 40
        assert core.generated_tokens == 0  # a read changes nothing

    def test_prefill_delays_the_next_step(self) -> None:
        shape = EngineShape(1000, slots=4, prefill_share=1.0)
        core = BatchingCore(shape)
        core.submit("a", 1000, 1, 0.0)
        assert core.next_event_s() == pytest.approx(shape.prefill_s(1000) + shape.step_s(1))

    def test_an_aborted_request_frees_its_slot(self) -> None:
        core = BatchingCore(EngineShape(1000, slots=1))
        core.submit("a", 0, 100, 0.0)
        core.submit("b", 0, 1, 0.0)
        assert core.cancel("a") and list(core.running) == ["b"]
        assert not core.cancel("a")


class TestLengths:
    def test_heavy_tailed_around_the_median_and_capped_by_max_tokens(self) -> None:
        model = LengthModel()
        lengths = [model.output_length(f"prompt {i}", 512, {})[0] for i in range(4000)]
        assert 115 <= statistics.median(lengths) <= 133
        assert 163 <= statistics.mean(lengths) <= 183
        assert max(lengths) == 512 and 0.04 < sum(n == 512 for n in lengths) / 4000 < 0.10

    def test_deterministic_per_prompt_and_seed(self) -> None:
        model = LengthModel()
        assert model.output_length("same", 512, {}) == model.output_length("same", 512, {})
        assert {model.natural_length("same", seed) for seed in range(20)} != {model.natural_length("same")}

    def test_ignore_eos_and_min_tokens_are_honoured(self) -> None:
        model = LengthModel(median=10, sigma=0.0)
        assert model.output_length("x", 50, {}) == (10, True)
        assert model.output_length("x", 5, {}) == (5, False)
        assert model.output_length("x", 50, {"ignore_eos": True}) == (50, False)
        assert model.output_length("x", 50, {"min_tokens": 30}) == (30, True)


class TestSimulatedBackend:
    def test_requests_finish_on_their_own_and_report_eos(self) -> None:
        backend = SimulatedBackend(50_000, engine_args={"median_output_tokens": 8, "output_sigma": 0.0})
        try:
            long, short = (
                backend.submit(BackendRequest("a b", 64, {"ignore_eos": True})),
                backend.submit(BackendRequest("c", 64)),
            )
            assert short.result(timeout=5).output_tokens == 8 and short.result().finish_reason == "stop"
            assert long.result(timeout=5).output_tokens == 64 and long.result().finish_reason == "length"
            assert long.result().text.split()[:3] == ["a", "b", "a"]
            assert backend.engine_load().generated_tokens == 72
        finally:
            backend.shutdown()

    def test_a_full_engine_runs_at_its_speed_in_real_time(self) -> None:
        backend = SimulatedBackend(20_000, engine_args={"slots": 32})
        try:
            started = time.monotonic()
            outputs = backend.generate([BackendRequest(f"p{i}", 200, {"ignore_eos": True}) for i in range(64)])
            elapsed = time.monotonic() - started
        finally:
            backend.shutdown()
        assert sum(o.output_tokens for o in outputs) == 64 * 200
        assert 0.9 * 64 * 200 / 20_000 <= elapsed <= 3 * 64 * 200 / 20_000  # two waves of 32 at full speed

    def test_unknown_engine_arguments_are_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown simulated engine argument"):
            SimulatedBackend(1000, engine_args={"max_num_seqs": 8})


class TestEngineSpeed:
    def test_a_full_window_measures_the_speed(self) -> None:
        speed = EngineSpeed(slots=100)
        for t in range(6):
            speed.sample(float(t), 1000 * t, 100.0 * t)
        assert speed.tokens_per_s == pytest.approx(1000)

    def test_before_a_full_window_a_low_one_is_scaled_to_the_slots(self) -> None:
        speed = EngineSpeed(slots=100)
        for t in range(3):
            speed.sample(float(t), 100 * t, 10.0 * t)
        assert speed.tokens_per_s == pytest.approx(1000)

    def test_a_burst_between_two_beats_counts_as_it_ran(self) -> None:
        speed = EngineSpeed(slots=100)
        speed.sample(0.0, 0, 0.0)
        speed.sample(1.0, 500, 5.0)  # 100 sequences for 50 ms: 500 tokens
        assert speed.tokens_per_s == pytest.approx(10_000)

    def test_a_full_measurement_stands_while_the_engine_runs_low(self) -> None:
        speed = EngineSpeed(slots=100)
        for t in range(6):
            speed.sample(float(t), 1000 * t, 100.0 * t)
        for t in range(6, 20):
            speed.sample(float(t), 6000 + 50 * (t - 6), 500 + 5.0 * (t - 6))
        assert speed.tokens_per_s == pytest.approx(1000)

    def test_an_old_estimate_is_dropped(self) -> None:
        speed = EngineSpeed(slots=10)
        for t in range(3):
            speed.sample(float(t), 100 * t, 10.0 * t)
        speed.sample(200.0, 300, 20.0)
        assert speed.tokens_per_s == 0.0


def test_an_aborted_simulated_request_is_cancelled_and_frees_its_slot() -> None:
    backend = SimulatedBackend(1000, engine_args={"slots": 1})
    try:
        stuck = backend.submit(BackendRequest("a", 10_000, {"ignore_eos": True}))
        behind = backend.submit(BackendRequest("b", 1, {"ignore_eos": True}))
        backend.abort(stuck)
        assert stuck.cancelled() and behind.result(timeout=5).output_tokens == 1
    finally:
        backend.shutdown()
