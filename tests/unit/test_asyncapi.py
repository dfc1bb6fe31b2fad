"""``banyan asyncapi``: the document is valid AsyncAPI 3.0.0 and says what is on the wire.

Validated against the official AsyncAPI 3.0.0 JSON Schema, vendored in
``tests/data/asyncapi-3.0.0.json`` (see ``tests/data/README.md``).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar

import jsonschema
import pytest
from pydantic import BaseModel

from banyan_bus import Command, CommandHandler, Event, EventHandler, MessageBus, Query, QueryHandler
from banyan_bus.asyncapi import asyncapi_document, subscriptions_of
from banyan_bus.envelope import encode
from banyan_bus.telemetry import Telemetry
from contracts.orders import OrderPlaced
from contracts.users import EmailSent, UserCreated, UserCreatedV2

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "tests/data/asyncapi-3.0.0.json").read_text(encoding="utf-8"))
EXAMPLES = [
    "examples.signup.user_service",
    "examples.signup.email_service",
    "examples.signup.analytics_service",
    "examples.signup.notification_service",
    "examples.orders.order_service",
    "examples.orders.payment_service",
    "examples.orders.shipping_service",
]

T = TypeVar("T")


class Address(BaseModel):
    street: str
    city: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int


class WarehouseMoved(Event):
    """A warehouse moved; nested models end up in components.schemas."""

    warehouse_id: str
    new_address: Address
    capacity: Decimal


class WarehouseMovedV2(Event, name="WarehouseMoved", version=2):
    warehouse_id: str
    new_address: Address
    reason: str = "unknown"


class ListWarehouses(Query, result=Page[Address]):
    city: str


class CloseWarehouse(Command):
    warehouse_id: str


@EventHandler(WarehouseMoved)
class Relabel:
    async def handle_v1(self, event: WarehouseMoved) -> None: ...

    async def handle_v2(self, event: WarehouseMovedV2) -> None: ...


@QueryHandler(ListWarehouses)
class Lister:
    async def handle(self, query: ListWarehouses) -> Page[Address]:
        return Page(items=[], total=0)


@CommandHandler(CloseWarehouse)
class Closer:
    async def handle(self, command: CloseWarehouse) -> None: ...


def assert_valid(document: dict[str, Any]) -> None:
    """Valid against the official schema, and every local ``$ref`` points at something."""
    errors = sorted(
        jsonschema.Draft7Validator(SCHEMA).iter_errors(document), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors)

    def resolve(pointer: str) -> Any:
        node: Any = document
        for part in pointer.removeprefix("#/").split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            assert isinstance(node, dict), f"dangling $ref {pointer}"
            assert part in node, f"dangling $ref {pointer}"
            node = node[part]
        return node

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                assert ref.startswith("#/"), f"non-local $ref {ref}"
                resolve(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)


def payload_validator(document: dict[str, Any], message_key: str) -> jsonschema.Draft7Validator:
    """A validator for a message's payload, resolving ``$ref`` inside the whole document."""
    root = {**document, "$ref": f"#/components/messages/{message_key}/payload"}
    return jsonschema.Draft7Validator(root)


@pytest.mark.parametrize("module", EXAMPLES)
def test_every_example_service_documents_as_valid_asyncapi_3(module: str) -> None:
    bus = importlib.import_module(module).bus
    document = asyncapi_document(bus)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == bus.service
    assert_valid(document)
    for sub in subscriptions_of(bus):
        operation = document["operations"][f"receive.{sub.group}.{sub.message_type}"]
        assert operation["action"] == "receive"
        channel = document["channels"][f"queues.{sub.group}.{sub.message_type}"]
        if sub.ordered:
            assert channel["address"] == sub.exchange
            assert channel["x-partition-queues"] == list(sub.queues)
        else:
            assert channel["address"] == sub.queues[0] == sub.exchange


async def test_versions_nested_models_commands_and_queries() -> None:
    bus = MessageBus("warehouse-service", "amqp://ops:s3cret@rabbit.internal:5673/prod")
    await bus.register(Relabel, Lister, Closer)
    document = asyncapi_document(bus, publishes=[WarehouseMovedV2, EmailSent], version="2.1.0")
    assert_valid(document)

    assert document["info"]["version"] == "2.1.0"
    server = document["servers"]["rabbitmq"]
    assert server == {
        "host": "rabbit.internal:5673",
        "pathname": "/prod",
        "protocol": "amqp",
        "protocolVersion": "0-9-1",
        "description": "RabbitMQ, virtual host 'prod'.",
    }
    assert "s3cret" not in json.dumps(document)
    assert "ops" not in json.dumps(document["servers"])

    # Both versions travel on the event's channel; the handler serves both.
    channel = document["channels"]["events.WarehouseMoved"]
    assert channel["address"] == "warehousemoved"
    assert set(channel["messages"]) == {"WarehouseMoved.v1", "WarehouseMoved.v2"}
    receive = document["operations"]["receive.warehouse-service.WarehouseMoved"]
    assert len(receive["messages"]) == 2
    # Only what the service says it publishes is a send operation, in the version it sends.
    sends = {k for k, op in document["operations"].items() if op["action"] == "send"}
    assert sends == {"publish.WarehouseMoved", "publish.EmailSent"}
    assert document["operations"]["publish.WarehouseMoved"]["messages"] == [
        {"$ref": "#/channels/events.WarehouseMoved/messages/WarehouseMoved.v2"}
    ]

    schemas = document["components"]["schemas"]
    assert "Address" in schemas  # shared nested model, defined once
    assert all(
        set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        for key in schemas
    )
    moved = schemas["WarehouseMoved"]
    assert {"warehouseId", "newAddress", "capacity"} <= set(moved["properties"])  # wire names

    # Requests the service owns: received, answered on the reply-to address.
    handle = document["operations"]["handle.ListWarehouses"]
    assert handle["action"] == "receive"
    assert handle["reply"]["address"] == {"location": "$message.header#/reply_to"}
    assert "handle.CloseWarehouse" in document["operations"]


def test_a_real_envelope_validates_against_its_message_payload() -> None:
    bus = MessageBus("user-service", "memory://")
    document = asyncapi_document(bus, publishes=[UserCreated, UserCreatedV2])
    event = UserCreated(
        user_id="usr_1", email="a@example.com", name="A", created_at=datetime.now(UTC)
    )
    # As the bus encodes it: a traceContext is always there (Telemetry.trace_context).
    trace = Telemetry.trace_context(None, {}, None)
    body = json.loads(encode(event, service_name="user-service", trace_context=trace).body)
    v1 = payload_validator(document, "UserCreated.v1")
    v1.validate(body)
    with pytest.raises(jsonschema.ValidationError):  # the schema says it is required
        v1.validate({**body, "traceContext": None})
    # The schema is strict where it matters: a v1 envelope is not a v2 message, and the
    # contract's required fields are required.
    with pytest.raises(jsonschema.ValidationError):
        payload_validator(document, "UserCreated.v2").validate(body)
    broken = {**body, "payload": {k: v for k, v in body["payload"].items() if k != "email"}}
    with pytest.raises(jsonschema.ValidationError):
        v1.validate(broken)


def test_memory_url_documents_the_embedded_broker() -> None:
    document = asyncapi_document(MessageBus("svc", "memory://demo"), publishes=[OrderPlaced])
    assert_valid(document)
    assert document["servers"]["embedded"]["protocol"] == "memory"


def test_cli_writes_the_document(tmp_path: Path) -> None:
    target = tmp_path / "asyncapi.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "banyan_bus.cli",
            "asyncapi",
            "examples.signup.email_service:bus",
            "-o",
            str(target),
            "--publishes",
            "EmailSent",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(target.read_text(encoding="utf-8"))
    assert_valid(document)
    assert document["info"]["title"] == "email-service"
    assert {k for k, op in document["operations"].items() if op["action"] == "send"} == {
        "publish.EmailSent"
    }
