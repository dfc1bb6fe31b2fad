"""Stages map to vhosts (``stage.py``); a bus says what it publishes (``publishes=``).

The broker half of the stage promise (two stages on one broker never see each
other's events) is ``tests/integration/test_stages.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from banyan_bus import MessageBus
from banyan_bus.asyncapi import asyncapi_document
from banyan_bus.errors import ConfigurationError
from banyan_bus.stage import scoped_url
from contracts.orders import OrderPlaced
from contracts.users import EmailSent, UserCreated

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "stage", "expected"),
    [
        ("amqp://u:p@rabbit:5672/", "dev", "amqp://u:p@rabbit:5672/dev"),
        ("amqp://u:p@rabbit:5672", "test", "amqp://u:p@rabbit:5672/test"),
        ("amqp://u:p@rabbit/%2F?heartbeat=8", "prod", "amqp://u:p@rabbit/prod?heartbeat=8"),
        ("amqp://u:p@rabbit/prod", "prod", "amqp://u:p@rabbit/prod"),  # already there
        ("amqp://u:p@n1/,amqp://u:p@n2/", "dev", "amqp://u:p@n1/dev,amqp://u:p@n2/dev"),
        ("memory://demo", "dev", "memory://demo/stage-dev"),
        ("amqp://u:p@rabbit/", None, "amqp://u:p@rabbit/"),
    ],
)
def test_a_stage_is_a_vhost(url: str, stage: str | None, expected: str) -> None:
    assert scoped_url(url, stage) == expected
    assert scoped_url(expected, stage) == expected  # applying it twice is harmless


def test_a_url_naming_another_vhost_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match="names vhost 'billing' but stage 'dev'") as exc:
        MessageBus("svc", "amqp://u:s3cret@rabbit/billing", stage="dev")
    assert "s3cret" not in str(exc.value)


@pytest.mark.parametrize("stage", ["Dev", "", "a b", "-dev", "x" * 64])
def test_invalid_stage_names_are_refused(stage: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid stage"):
        MessageBus("svc", "amqp://u:p@rabbit/", stage=stage or "?")


def test_banyan_stage_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANYAN_STAGE", "test")
    bus = MessageBus("svc", "amqp://u:p@rabbit:5672/")
    assert bus.stage == "test"
    assert bus.url == "amqp://u:p@rabbit:5672/test"
    assert bus.display_url == "amqp://u:***@rabbit:5672/test"
    assert MessageBus("svc", "amqp://u:p@rabbit/", stage="prod").stage == "prod"  # code wins


def _sends(document: dict[str, object]) -> set[str]:
    operations = document["operations"]
    assert isinstance(operations, dict)
    return {key for key, op in operations.items() if op["action"] == "send"}


def test_asyncapi_lists_what_the_bus_says_it_publishes() -> None:
    bus = MessageBus("signup-web", "memory://x", publishes=[UserCreated])
    assert _sends(asyncapi_document(bus)) == {"publish.UserCreated"}
    # The CLI's --publishes (the function's argument) still overrides it.
    override = asyncapi_document(bus, publishes=[EmailSent, OrderPlaced])
    assert _sends(override) == {"publish.EmailSent", "publish.OrderPlaced"}
    # A bus that says nothing: every event contract imported (the old default).
    assert len(_sends(asyncapi_document(MessageBus("other", "memory://x")))) > 2


def test_publishes_takes_event_contracts_only() -> None:
    with pytest.raises(ConfigurationError, match="publishes= takes event contracts"):
        MessageBus("svc", publishes=["UserCreated"])  # type: ignore[list-item]


def test_the_asyncapi_command_uses_the_declared_publishes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "banyan_bus.cli", "asyncapi", "examples.signup.email_service:bus"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _sends(json.loads(result.stdout)) == {"publish.EmailSent"}
