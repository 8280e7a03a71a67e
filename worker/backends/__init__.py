"""Inference backends, selected by ``gpulb worker --backend NAME``.

Engines are imported only when their backend is chosen: a worker with the simulated or openai
backend never imports torch, and ``CUDA_VISIBLE_DEVICES`` is set before any engine import.
"""

from __future__ import annotations

from gpulb.settings import BackendName, WorkerSettings
from worker.backends.base import Backend, BackendOutput, BackendRequest, EngineLoad
from worker.backends.simulated import LinearSimulatedBackend, SimulatedBackend

__all__ = ["Backend", "BackendOutput", "BackendRequest", "EngineLoad", "create_backend"]


def create_backend(settings: WorkerSettings) -> Backend:
    """The configured backend, not yet started (``start()`` loads the model)."""
    name = settings.backend
    model_path = settings.model_path or settings.model or ""
    if name is BackendName.TRANSFORMERS:
        from worker.backends.hf_transformers import TransformersBackend

        return TransformersBackend(model_path, dtype=settings.dtype)
    if name is BackendName.OPENAI:
        from worker.backends.openai_server import OpenAIServerBackend

        return OpenAIServerBackend.from_settings(settings)
    if name is BackendName.VLLM:
        from worker.backends.vllm_engine import VllmBackend

        return VllmBackend(model_path, dtype=settings.dtype, engine_args=settings.engine_args)
    if name is BackendName.TENSORRT_LLM:
        from worker.backends.trtllm import TensorRTLLMBackend

        return TensorRTLLMBackend(model_path, dtype=settings.dtype, engine_args=settings.engine_args)
    if name is BackendName.SIMULATED_LINEAR:
        return LinearSimulatedBackend(settings.tokens_per_s, simulate_faults=settings.simulate_faults)
    engine_args = dict(settings.engine_args)
    if settings.slots is not None:
        engine_args.setdefault("slots", settings.slots)
    return SimulatedBackend(settings.tokens_per_s, simulate_faults=settings.simulate_faults, engine_args=engine_args)
