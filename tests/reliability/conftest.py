"""Reliability suite (issue 10): faults injected mid-stream, every event id counted.

Every test here is marked ``reliability``; select it with ``pytest -m reliability`` or leave
it out with ``-m "not reliability"``. Figures go to ``reports/reliability/RESULTS.md``
(git-ignored); ``python -m tests.reliability.results --commit`` copies them into the
committed ``tests/reliability/RESULTS.md``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: fault-injection suite (slow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def redis_url() -> str:
    """The real Redis (``BANYAN_TEST_REDIS_URL``, default ``redis://localhost:6379/0``); the
    test fails loudly if it does not answer (never skipped)."""
    import redis

    url = os.environ.get("BANYAN_TEST_REDIS_URL", "redis://localhost:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable ({type(exc).__name__}: {exc}); start it with "
            "`bash scripts/services.sh redis` or set BANYAN_TEST_REDIS_URL",
            pytrace=False,
        )
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A key prefix only this test uses; its keys are deleted afterwards."""
    import redis

    prefix = f"banyan-reliability:{request.node.name[:40]}:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
