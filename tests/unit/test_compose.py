"""docker-compose.yml and the Dockerfile: valid, and every command is one the real CLI accepts.

``docker-compose config`` validates the file (``./dev test`` installs Debian's docker-compose);
the rest reads the file itself: Redis durable and health-checked, services waiting for it, one
GPU reserved per GPU worker, and each service's command and environment turned into Settings by
the same code path ``gpulb`` uses.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from gpulb.cli.main import build_parser, settings_from_args
from gpulb.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["gpu", "cpu", "metrics", "tools"]


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor the docker compose plugin is installed (./dev test installs it)")


def resolve_compose(**env: str) -> dict[str, Any]:
    """The file as Compose resolves it (anchors merged, ${VAR:-default} filled), every profile on."""
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    done = subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), *profiles, "config"],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env})  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return resolve_compose()


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, in either syntax ``config`` writes (long in Compose v2, short in v1)."""
    return [
        (v["source"], v["target"]) if isinstance(v, dict) else (v.split(":")[0], v.split(":")[1])
        for v in service.get("volumes", [])
    ]


def gpulb_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image", "").startswith("gpulb")}


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions in order, (KEYWORD, arguments), continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def dockerfile_variables(keyword: str) -> dict[str, str]:
    """Every ENV (or ARG, with its default) of the Dockerfile, by name."""
    pairs = [word.partition("=") for kw, args in dockerfile() if kw == keyword for word in shlex.split(args)]
    return {name: value for name, _, value in pairs}


def run_commands() -> list[tuple[int, str]]:
    """Each shell command of each RUN (split at ``&&``), with the index of its instruction."""
    return [(i, c.strip()) for i, (kw, args) in enumerate(dockerfile()) if kw == "RUN" for c in args.split("&&")]


def argv(command: str, **env: str) -> list[str]:
    """The arguments a shell command gets once bash has expanded it, quotes and ``${X:+...}`` included.

    Only for the Dockerfile's own commands, and only those the test picked by name: bash runs any ``$(...)`` in them.
    """
    program, _, arguments = command.partition(" ")
    done = subprocess.run(["bash", "-c", f"printf '%s\\n' {program} {arguments}"],
                          capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", **env})  # fmt: skip
    return done.stdout.splitlines()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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
        assert ("redis-data", "/data") in mounts(redis)
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

    def test_the_cli_writes_data_as_the_host_user(self, compose: dict[str, Any]) -> None:
        """``docker compose run --rm cli submit ... -o /data/out.jsonl``: ./data is the host user's."""
        cli = compose["services"]["cli"]
        assert any(target == "/data" and Path(source).name == "data" for source, target in mounts(cli))
        assert cli["user"] == "1000:1000"
        assert resolve_compose(GPULB_UID="1234", GPULB_GID="4321")["services"]["cli"]["user"] == "1234:4321"
        # No passwd entry for that uid in the image: Docker would set HOME=/, which only root can write.
        assert cli["environment"]["HOME"] == "/tmp"
        for name, svc in gpulb_services(compose).items():
            assert name == "cli" or "user" not in svc, name
        assert "GPULB_UID=$(id -u) GPULB_GID=$(id -g) docker compose run" in " ".join(
            (ROOT / "README.md").read_text().replace("\\\n", " ").split()
        )


class TestDockerfile:
    def test_copies_every_package_and_runs_the_cli(self) -> None:
        dockerfile = (ROOT / "Dockerfile").read_text()
        pyproject = (ROOT / "pyproject.toml").read_text()
        packages = re.search(r"include = \[(.*?)\]", pyproject).group(1)  # type: ignore[union-attr]
        for package in re.findall(r'"(\w+)\*"', packages):
            assert f"COPY {package} ./{package}" in dockerfile, package
        assert 'ENTRYPOINT ["gpulb"]' in dockerfile and "USER gpulb" in dockerfile
        assert 'pip install ".${EXTRAS:+[$EXTRAS]}"' in dockerfile

    def test_the_model_cache_is_made_in_the_image_owned_by_gpulb_and_is_where_compose_mounts_it(
        self, compose: dict[str, Any]
    ) -> None:
        """A volume mounted on a path the image lacks is created root-owned: uid 10001 could not download a model."""
        instructions = dockerfile()
        hf_home = dockerfile_variables("ENV")["HF_HOME"]
        made = [
            (i, args)
            for i, command in run_commands()
            if command.startswith("install ") and hf_home in (args := argv(command, HF_HOME=hf_home))
        ]
        assert made, f"no RUN makes {hf_home} (install -d -o gpulb -g gpulb)"
        (index, args), *_ = made
        assert "-d" in args and args[args.index("-o") + 1] == "gpulb" and args[args.index("-g") + 1] == "gpulb"
        user_made = [i for i, command in run_commands() if command.startswith("useradd") and command.endswith(" gpulb")]
        assert user_made and user_made[0] <= index < instructions.index(("USER", "gpulb"))

        hf_mounts = {name: target for name, svc in compose["services"].items() for source, target in mounts(svc)
                     if source == "hf-cache"}  # fmt: skip
        assert {"worker-gpu0", "worker-gpu1"} <= set(hf_mounts)
        assert set(hf_mounts.values()) == {hf_home}
        for name in hf_mounts:
            assert compose["services"][name]["environment"].get("HF_HOME", hf_home) == hf_home, name
            assert "user" not in compose["services"][name], name  # the image's gpulb, who owns the cache

    def test_the_install_is_pinned_by_the_constraints_file(self) -> None:
        """Every build installs the versions in constraints.txt, and it pins every runtime dependency exactly."""
        instructions, args = dockerfile(), dockerfile_variables("ARG")
        assert args["CONSTRAINTS"] == "constraints.txt"
        (index, pip), *_ = [(i, c) for i, c in run_commands() if c.startswith("pip install")]
        assert argv(pip, EXTRAS=args["EXTRAS"], CONSTRAINTS=args["CONSTRAINTS"]) == [
            "pip",
            "install",
            f".[{args['EXTRAS']}]",
            "-c",
            "constraints.txt",
        ]
        unpinned = argv(pip, EXTRAS="vllm", CONSTRAINTS="")  # --build-arg CONSTRAINTS= (README: a GPU build)
        assert unpinned == ["pip", "install", ".[vllm]"]
        copied = [i for i, (kw, a) in enumerate(instructions)
                  if kw == "COPY" and any(fnmatch.fnmatch("constraints.txt", s) for s in a.split()[:-1])]  # fmt: skip
        assert copied and copied[0] < index, "constraints.txt is not copied into the image before the install"
        ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
        assert not any(fnmatch.fnmatch("constraints.txt", pattern) for pattern in ignored if pattern)

        pins: dict[str, str] = {}
        for line in (ROOT / "constraints.txt").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                pinned = Requirement(line)
                (spec,) = pinned.specifier
                assert spec.operator == "==" and not pinned.url and not pinned.marker, line
                pins[canonical(pinned.name)] = spec.version
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][args["EXTRAS"]]]
        for requirement in wanted:
            assert canonical(requirement.name) in pins, f"{requirement.name} is not pinned in constraints.txt"
            assert pins[canonical(requirement.name)] in requirement.specifier, requirement
            for extra in requirement.extras:  # redis[hiredis]: what the extra brings is pinned too
                brought = [Requirement(r) for r in metadata.requires(requirement.name) or []]
                brought = [
                    r for r in brought if r.marker and "extra" in str(r.marker) and r.marker.evaluate({"extra": extra})
                ]
                assert brought, requirement
                for r in brought:
                    assert canonical(r.name) in pins, f"{r.name} ({requirement}) is not pinned in constraints.txt"
        for engine in ("vllm", "tensorrt", "transformers"):  # a GPU build pins its own (README)
            for requirement in map(Requirement, project["optional-dependencies"][engine]):
                assert canonical(requirement.name) not in pins, requirement.name

    def test_the_gpu_build_is_given_a_constraints_file_the_image_copies(self, compose: dict[str, Any]) -> None:
        copy_sources = [src for kw, a in dockerfile() if kw == "COPY" for src in a.split()[:-1]]
        for name in ("worker-gpu0", "worker-gpu1"):
            build_args = compose["services"][name]["build"]["args"]
            assert build_args["EXTRAS"] == "vllm"
            assert (ROOT / build_args["CONSTRAINTS"]).is_file(), name
            assert any(fnmatch.fnmatch(build_args["CONSTRAINTS"], src) for src in copy_sources), name
        own = resolve_compose(GPULB_GPU_CONSTRAINTS="constraints-vllm.txt")["services"]["worker-gpu0"]["build"]["args"]
        assert own["CONSTRAINTS"] == "constraints-vllm.txt"
        assert any(fnmatch.fnmatch("constraints-vllm.txt", src) for src in copy_sources)
