"""The yardsticks of the open-loop benchmark, against textbook values."""

from __future__ import annotations

import pytest

from bench.queueing import erlang_c, mmc_wait, random_split_wait


class TestErlangC:
    def test_textbook_values(self) -> None:
        assert erlang_c(1, 0.8) == pytest.approx(0.8)  # M/M/1: P(wait) = rho
        assert erlang_c(4, 3.2) == pytest.approx(0.5964, abs=1e-4)
        assert erlang_c(2, 1.0) == pytest.approx(1 / 3)

    def test_m_m_4_at_80_percent_beats_random_split_about_5x(self) -> None:
        mean, p99 = mmc_wait(4, 16.0, 5.0)
        split_mean, split_p99 = random_split_wait(4, 16.0, 5.0)
        assert mean == pytest.approx(0.5964 / 4.0, abs=1e-3)
        assert split_mean == pytest.approx(0.8, abs=1e-9)  # rho / (mu - lambda_i) = 0.8 / 1.0
        assert split_mean / mean == pytest.approx(5.36, abs=0.02)
        assert 0 < p99 < split_p99
