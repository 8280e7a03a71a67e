"""docker-compose.yml and the Dockerfile: valid, and every command is one the real CLI accepts.

``docker-compose config`` validates the file (``./dev test`` installs Debian's docker-compose);
the rest reads the file itself: Redis durable and health-checked, services waiting for it, one
GPU reserved per GPU worker, and each service's command and environment turned into Settings by
the same code path ``gpulb`` uses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpulb.cli import build_parser, settings_from_args
from gpulb.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["gpu", "cpu", "metrics", "tools"]


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor the docker compose plugin is installed (./dev test installs it)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as Compose resolves it (anchors merged, ${VAR:-default} filled), every profile on."""
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    done = subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), *profiles, "config"],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


def gpulb_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image", "").startswith("gpulb")}


def settings_for(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Settings]:
    """Parse the service's command with gpulb's own parser, in the service's environment."""
    for name in [n for n in os.environ if n.startswith("GPULB_")]:
        monkeypatch.delenv(name)
    for name, value in (service.get("environment") or {}).items():
        monkeypatch.setenv(name, str(value))
    args = build_parser(Settings(_env_file=None)).parse_args(service["command"])  # type: ignore[call-arg]
    return args, settings_from_args(args)


class TestCompose:
    def test_redis_is_durable_health_checked_and_kept(self, compose: dict[str, Any]) -> None:
        redis = compose["services"]["redis"]
        command = " ".join(redis["command"])
        assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
        assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
        mounts = [
            (v["source"], v["target"]) if isinstance(v, dict) else tuple(v.split(":")[:2]) for v in redis["volumes"]
        ]
        assert ("redis-data", "/data") in mounts
        assert "redis-data" in compose["volumes"]

    def test_every_gpulb_service_waits_for_redis_and_reads_it_from_the_environment(
        self, compose: dict[str, Any]
    ) -> None:
        services = gpulb_services(compose)
        assert {"balancer", "gateway", "worker-gpu0", "worker-gpu1", "worker-sim-a", "worker-sim-b", "cli"} <= set(
            services
        )
        for name, svc in services.items():
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
            assert svc["environment"]["GPULB_REDIS_URL"] == "redis://redis:6379/0", name

    def test_commands_and_environment_are_the_real_cli(
        self, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name, svc in gpulb_services(compose).items():
            args, settings = settings_for(svc, monkeypatch)
            assert settings.redis_url == "redis://redis:6379/0", name
            if args.command == "worker":
                assert settings.worker.model and settings.worker.id, name
                assert settings.metrics_port == 9100, name
        _, gpu0 = settings_for(compose["services"]["worker-gpu0"], monkeypatch)
        assert (gpu0.worker.backend.value, gpu0.worker.model_path) == ("vllm", "meta-llama/Llama-3.1-8B-Instruct")
        assert gpu0.worker.engine_args == {"gpu_memory_utilization": 0.9}

    def test_each_gpu_worker_reserves_its_own_gpu(self, compose: dict[str, Any]) -> None:
        gpu_workers = {n: s for n, s in compose["services"].items() if "gpu" in s.get("profiles", [])}
        assert set(gpu_workers) == {"worker-gpu0", "worker-gpu1"}
        seen = []
        for svc in gpu_workers.values():
            (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            seen += device["device_ids"]
        assert sorted(seen) == ["0", "1"]

    def test_cpu_profile_runs_simulated_workers_at_mixed_speeds(
        self, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        speeds = []
        for name in ("worker-sim-a", "worker-sim-b"):
            assert compose["services"][name]["profiles"] == ["cpu"]
            _, settings = settings_for(compose["services"][name], monkeypatch)
            assert settings.worker.backend.value == "simulated"
            speeds.append(settings.worker.tokens_per_s)
        assert len(set(speeds)) == 2

    def test_prometheus_scrapes_the_balancer_and_every_worker(self, compose: dict[str, Any]) -> None:
        config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
        targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
        names = {n for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
        assert targets == {"balancer:9100"}
        workers = {n for n, s in gpulb_services(compose).items() if s["command"][0] == "worker"}
        assert names == workers


class TestDockerfile:
    def test_copies_every_package_and_runs_the_cli(self) -> None:
        dockerfile = (ROOT / "Dockerfile").read_text()
        pyproject = (ROOT / "pyproject.toml").read_text()
        packages = re.search(r"include = \[(.*?)\]", pyproject).group(1)  # type: ignore[union-attr]
        for package in re.findall(r'"(\w+)\*"', packages):
            assert f"COPY {package} ./{package}" in dockerfile, package
        assert 'ENTRYPOINT ["gpulb"]' in dockerfile and "USER gpulb" in dockerfile
        assert 'pip install ".${EXTRAS:+[$EXTRAS]}"' in dockerfile
