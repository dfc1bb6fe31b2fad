"""Fixtures for tests against real services other than RabbitMQ (Redis).

* ``redis_url`` -- ``BANYAN_TEST_REDIS_URL`` (default ``redis://localhost:6379/0``), checked
  to answer PING once per session. If it does not, every test using it FAILS with how to
  start Redis: a skipped Redis test proves nothing.
* ``redis_prefix`` -- a key prefix unique to this test; every key under it is deleted after
  the test (pass or fail).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
_START_HINT = (
    "Start a local Redis with `bash scripts/services.sh redis` (or run the suite through "
    "`bash scripts/test.sh`, which does it for you), or point BANYAN_TEST_REDIS_URL at one."
)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@pytest.fixture(scope="session")
def _redis_status() -> tuple[str, str | None]:
    """(url, None) if Redis answers PING, else (url, why not); checked once per session."""
    url = os.environ.get("BANYAN_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        return url, f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return url, None


@pytest.fixture
def redis_url(_redis_status: tuple[str, str | None]) -> str:
    """URL of the real Redis the test uses; fails the test loudly if Redis does not answer."""
    url, problem = _redis_status
    if problem is not None:
        pytest.fail(
            f"Redis is not reachable at {_redact(url)} ({problem}); this test needs a real "
            f"Redis and is never skipped. {_START_HINT}",
            pytrace=False,
        )
    return url


@pytest.fixture
def redis_prefix(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A key prefix only this test uses; its keys are deleted afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    prefix = f"banyan-test:{slug}:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
