"""Shared fixtures: a private redis-server per test session (never the machine's 6379)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from gpulb import keys
from gpulb.cli.redis_server import RedisServer
from gpulb.settings import Settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    yield redis_server.url
    conn.close()


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def make_settings(redis_url: str, **overrides: object) -> Settings:
    return Settings(_env_file=None, redis_url=redis_url, **overrides)  # type: ignore[call-arg]


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return make_settings(redis_url)


def waiting(conn: redis.Redis, model: str = "m") -> list[tuple[keys.IngressMember, float]]:
    """Every request waiting in the model's ingress, one per request with its own score, in pop order.

    Also checks the ingress counters against what is really there.
    """
    requests = []
    for member, score in conn.zrange(keys.ingress_key(model), 0, -1, withscores=True):
        for offset, request in enumerate(keys.parse_ingress_member(member).requests()):
            requests.append((request, score + offset))
    assert int(conn.get(keys.ingress_requests_key(model)) or 0) == len(requests)
    assert int(conn.get(keys.ingress_tokens_key(model)) or 0) == sum(r.costs[0] for r, _ in requests)
    return requests
