"""Inference backends, selected by ``gpulb worker --backend NAME``."""

from __future__ import annotations

from gpulb.errors import ConfigError
from gpulb.settings import BackendName, WorkerSettings
from worker.backends.base import Backend, BackendOutput, BackendRequest, EngineLoad
from worker.backends.simulated import SimulatedBackend

__all__ = ["Backend", "BackendOutput", "BackendRequest", "EngineLoad", "create_backend"]


def create_backend(settings: WorkerSettings) -> Backend:
    if settings.backend is BackendName.SIMULATED:
        return SimulatedBackend(settings.tokens_per_s, simulate_faults=settings.simulate_faults)
    raise ConfigError(f"backend {settings.backend!r} is not available")  # pragma: no cover
