"""Embedding requests through the fleet: a worker whose backend cannot embed refuses them with a 400, on the
continuous path (the runner) and on the static one (the isolating executor) alike."""

from __future__ import annotations

import pytest

from producer import Client
from tests.integration.conftest import StartWorker, balancer, work
from worker.backends.simulated import LinearSimulatedBackend, SimulatedBackend, simulated_embedding


@pytest.mark.parametrize("engine_class", [SimulatedBackend, LinearSimulatedBackend])
def test_a_backend_that_cannot_embed_refuses_embeddings_and_still_generates(
    engine_class: type[SimulatedBackend | LinearSimulatedBackend], client: Client, conn: object, redis_url: str,
    start_worker: StartWorker,
) -> None:  # fmt: skip
    engine = engine_class(1e6)
    engine.can_embed = False  # as the TensorRT-LLM backend, or an engine server without /v1/embeddings
    w = start_worker("w", engine=engine)
    batch = client.submit_batch([{"input": ["to embed"]}, "to complete"], model="m", max_tokens=3)
    balancer(conn).dispatch_round()  # type: ignore[arg-type]
    work(w, redis_url)
    refused, answered = batch.results(timeout=10)
    assert (refused.error_status, refused.embeddings) == (400, None)
    assert refused.error is not None and "cannot embed" in refused.error
    assert answered.ok and answered.text == "to complete to"


def test_a_backend_that_embeds_answers_every_input(
    client: Client, conn: object, redis_url: str, start_worker: StartWorker
) -> None:
    w = start_worker("w")
    batch = client.submit_batch([{"input": ["one two", "three"]}], model="m")
    balancer(conn).dispatch_round()  # type: ignore[arg-type]
    work(w, redis_url)
    (result,) = batch.results(timeout=10)
    assert result.embeddings == [simulated_embedding("one two"), simulated_embedding("three")]
    assert (result.prompt_tokens, result.output_tokens, result.error) == (3, 0, None)
