"""The ``gpulb`` command line itself, as a subprocess: global options anywhere, clear errors, closed pipes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpulb.cli", *args]


class TestGlobalOptions:
    @pytest.mark.parametrize(
        "args",
        [("status", "--json", "--redis-url", "URL"), ("batch", "list", "--redis-url", "URL"),
         ("batch", "--redis-url", "URL", "list"), ("--redis-url", "redis://127.0.0.1:1/0", "status", "--redis-url",
                                                   "URL", "--json")],
    )  # fmt: skip
    def test_are_accepted_after_the_command_and_win_there(self, redis_url: str, args: tuple[str, ...]) -> None:
        done = subprocess.run(cli(*(redis_url if a == "URL" else a for a in args)), capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        assert (done.returncode, done.stderr) == (0, "")

    def test_an_option_left_out_after_the_command_keeps_the_one_before_it(self, redis_url: str) -> None:
        done = subprocess.run(cli("--redis-url", redis_url, "status", "--log-level", "debug", "--json"),
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f'"redis_url": "{redis_url}"' in done.stdout

    @pytest.mark.parametrize("args", [("--log-level", "nope", "status"), ("status", "--log-level", "nope")])
    def test_an_unknown_log_level_is_a_clear_error(self, args: tuple[str, ...]) -> None:
        done = subprocess.run(cli(*args), capture_output=True, text=True, timeout=30)
        assert done.returncode == 1
        assert done.stderr == (
            "gpulb: error: invalid setting log_level: 'nope': expected one of debug, info, warning, error, critical\n"
        )

    def test_a_setting_refused_by_a_validator_reads_without_pydantic_s_prefix(self) -> None:
        done = subprocess.run(cli("balancer", "--policy", "fastest"), capture_output=True, text=True, timeout=30)
        assert done.returncode == 1
        assert done.stderr.startswith("gpulb: error: invalid setting balancer.policy: unknown policy 'fastest'; ")

    def test_an_environment_setting_refused_by_a_validator_reads_without_pydantic_s_prefix(self) -> None:
        env = {**os.environ, "GPULB_BALANCER__POLICY": "fastest"}
        done = subprocess.run(cli("status"), capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 2
        assert done.stderr.startswith(
            "gpulb: error: invalid environment setting balancer.policy: unknown policy 'fastest'; "
        )


class TestClosedPipe:
    @pytest.mark.parametrize("args", [("status",), ("batch", "list"), ("status", "--watch", "--interval", "0.1")])
    def test_writing_to_a_closed_pipe_exits_quietly(self, redis_url: str, args: tuple[str, ...]) -> None:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader has gone, as `head -1` goes after one line
        try:
            done = subprocess.run(cli("--redis-url", redis_url, *args), stdout=write_end, stderr=subprocess.PIPE,
                                  text=True, timeout=30)  # fmt: skip
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr) == (141, "")
