"""Shared fixtures: a private RabbitMQ vhost per test, a private in-memory broker per test.

Fixtures:

* ``amqp_url`` -- a fresh vhost ``banyan-test-<test-slug>-<8 hex>`` on the real broker, deleted
  after the test (pass or fail). Tests using it are marked ``amqp`` automatically.
* ``memory_url`` -- ``memory://<uuid>``, a private in-process broker.
* ``bus_url`` -- parametrized ``memory`` / ``amqp``: the contract suite runs once per transport.
* ``unique`` -- ``unique(prefix)`` gives a name unique to this test.

If any selected test needs the broker and it does not answer, the session stops with exit
code 3 and says how to start RabbitMQ: broker tests are never skipped.

Helpers for reading the broker's own view (queues, exchanges, bindings) and for closing a
vhost's connections live in ``tests/brokers.py``: ``from tests.brokers import list_queues``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Make ``tests.brokers`` importable however pytest was started (plain ``pytest`` does not put
# the repository root on sys.path; ``python -m pytest`` does).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests import brokers  # noqa: E402

AMQP_MARKER = "amqp"
_START_HINT = (
    "Start the local services with `bash scripts/services.sh` (RabbitMQ with the "
    "rabbitmq_management and rabbitmq_consistent_hash_exchange plugins), or run the suite "
    "through `bash scripts/test.sh`, which does it for you (and falls back to a testcontainers "
    "broker when Docker is available). To use another broker set BANYAN_TEST_AMQP_URL and "
    "BANYAN_TEST_MANAGEMENT_URL."
)


def _needs_broker(item: pytest.Item) -> bool:
    fixturenames: list[str] = list(getattr(item, "fixturenames", ()))
    if "amqp_url" in fixturenames:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("bus_url") == "amqp"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_broker(item) and item.get_closest_marker(AMQP_MARKER) is None:
            item.add_marker(AMQP_MARKER)


@pytest.fixture(scope="session", autouse=True)
def _require_broker_for_amqp_tests(request: pytest.FixtureRequest) -> None:
    """Fail the whole session, loudly, if broker tests were selected and there is no broker."""
    items = request.session.items
    if not any(item.get_closest_marker(AMQP_MARKER) is not None for item in items):
        return
    amqp = brokers.redact_url(brokers.amqp_base_url())
    if not brokers.broker_reachable(timeout=5.0):
        pytest.exit(
            f"RabbitMQ is not reachable at {amqp}, and selected tests are marked 'amqp' "
            f"(they need the real broker; they are never skipped). {_START_HINT}",
            returncode=3,
        )
    if not brokers.management_reachable(timeout=10.0):
        pytest.exit(
            f"RabbitMQ answers at {amqp} but its management API does not at "
            f"{brokers.management_url()} (with the URL's credentials); the tests create a vhost "
            f"per test through it. Enable it: `rabbitmq-plugins enable rabbitmq_management`. "
            f"{_START_HINT}",
            returncode=3,
        )


def _slug(text: str, max_len: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "test"


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """AMQP URL of a fresh vhost that only this test uses; the vhost is deleted afterwards."""
    if request.node.get_closest_marker(AMQP_MARKER) is None:
        request.node.add_marker(AMQP_MARKER)
    name = f"banyan-test-{_slug(request.node.name)}-{uuid.uuid4().hex[:8]}"
    try:
        yield brokers.create_vhost(name)
    finally:
        if not brokers.retire_vhost(name):
            _deferred_vhosts.append(name)


_deferred_vhosts: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Delete the vhosts a leaked client kept alive, now that every test is over."""
    for name in _deferred_vhosts:
        try:
            brokers.close_connections(name)
            brokers.delete_vhost(name)
        except brokers.BrokerAdminError as exc:
            print(f"could not delete test vhost {name}: {exc}", file=sys.stderr)


def _reset_memory_brokers() -> None:
    """Call ``banyan_bus.transport.memory.reset_brokers()`` if that module and function exist."""
    module_name = "banyan_bus.transport.memory"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only "the module is not written (yet)" is tolerated; a broken import is an error.
        if exc.name in {"banyan_bus", "banyan_bus.transport", module_name}:
            return
        raise
    reset = getattr(module, "reset_brokers", None)
    if not callable(reset):
        return
    result = reset()
    if inspect.isawaitable(result):

        async def _await() -> None:
            await result

        asyncio.run(_await())


@pytest.fixture
def memory_url() -> Iterator[str]:
    """``memory://<uuid>``: a private in-process broker for this test."""
    try:
        yield f"memory://{uuid.uuid4().hex}"
    finally:
        _reset_memory_brokers()


@pytest.fixture(params=["memory", "amqp"], ids=["memory", "amqp"])
def bus_url(request: pytest.FixtureRequest) -> str:
    """The URL of a private broker, once per transport (``memory`` and ``amqp``)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique(prefix)`` -> ``"<prefix>-<8 hex>"``, a name no other test uses."""

    def make(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    return make
