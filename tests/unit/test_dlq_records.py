"""Writing and reading DLQ records (ours and the broker's) and building replays, without a
broker."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from banyan_bus import Event, deadletter
from banyan_bus.deadletter import record_headers, republish
from banyan_bus.dlq import DeadLetter, DeadLetterQueue
from banyan_bus.transport.base import Delivery, Headers
from banyan_bus.transport.memory import MemoryTransport


class CrateWeighed(Event):
    crate_id: str


T0 = datetime(2025, 11, 15, 10, 30, 0, 123000, tzinfo=UTC)
T1 = datetime(2025, 11, 15, 10, 31, 0, tzinfo=UTC)

ENVELOPE = {
    "id": "evt_1",
    "correlationId": "cor_1",
    "timestamp": "2025-11-15T10:29:00.000Z",
    "serviceName": "user-service",
    "messageType": "UserCreated",
    "version": 2,
    "payload": {"userId": "usr_1"},
}


class FakeDelivery(Delivery):
    """A delivery that only records how it was settled."""

    __slots__ = ("outcome",)

    def __init__(
        self,
        body: bytes,
        headers: Headers,
        *,
        message_id: str | None = None,
        message_type: str | None = None,
        priority: int | None = None,
    ) -> None:
        super().__init__(
            body=body,
            headers=headers,
            message_id=message_id,
            correlation_id="cor_1",
            message_type=message_type,
            timestamp=T0,
            priority=priority,
            content_type="application/json",
            reply_to=None,
            redelivered=False,
            exchange="",
            routing_key="dlq.exchange.platform.events.email.usercreated",
        )
        self.outcome: str | None = None

    async def ack(self) -> None:
        self.outcome = "ack"

    async def nack(self, *, requeue: bool = True) -> None:
        self.outcome = f"nack(requeue={requeue})"

    async def reject(self) -> None:
        self.outcome = "reject"

    @property
    def settled(self) -> bool:
        return self.outcome is not None


def banyan_record(**overrides: object) -> Headers:
    headers: Headers = {
        "x-version": 2,
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        "x-partition-key": "usr_1",
        "x-banyan-reason": "handler-failed",
        "x-banyan-exception-type": "ValueError",
        "x-banyan-exception-message": "smtp said no",
        "x-banyan-traceback": "Traceback (most recent call last):\n  ...\nValueError: smtp said no",
        "x-attempt": 5,
        "x-banyan-handler": "email.handlers.send_welcome",
        "x-banyan-group": "email",
        "x-banyan-first-failure": "2025-11-15T10:30:00.123Z",
        "x-banyan-last-failure": "2025-11-15T10:31:00.000Z",
        "x-banyan-original-exchange": "exchange.platform.events",
        "x-banyan-original-routing-key": "usercreated",
        "x-banyan-handled": ["email.handlers.audit"],
        "x-banyan-delay": 1000,
    }
    headers.update(overrides)  # type: ignore[arg-type]
    return headers


def broker_record(reason: str, **extra: object) -> Headers:
    headers: Headers = {
        "x-version": 1,
        "x-death": [
            {
                "count": 1,
                "reason": reason,
                "queue": "exchange.platform.events.email.usercreated",
                "time": T1,
                "exchange": "exchange.platform.events.email.usercreated",
                "routing-keys": ["usercreated"],
            }
        ],
        "x-first-death-reason": reason,
        "x-first-death-queue": "exchange.platform.events.email.usercreated",
        "x-first-death-exchange": "exchange.platform.events.email.usercreated",
    }
    headers.update(extra)  # type: ignore[arg-type]
    return headers


def test_reads_our_failure_record() -> None:
    body = json.dumps(ENVELOPE).encode()
    dead = DeadLetter.from_delivery(
        FakeDelivery(
            body, banyan_record(), message_id="evt_1", message_type="UserCreated", priority=3
        )
    )
    assert dead.source == "banyan"
    assert dead.message_id == dead.ref == "evt_1"
    assert (dead.message_type, dead.version) == ("UserCreated", 2)
    assert dead.reason == "handler-failed"
    assert (dead.exception_type, dead.exception_message) == ("ValueError", "smtp said no")
    assert dead.traceback is not None
    assert dead.traceback.endswith("smtp said no")
    assert dead.attempts == 5
    assert dead.first_failure == T0
    assert dead.last_failure == T1
    assert dead.handler == "email.handlers.send_welcome"
    assert dead.group == "email"
    assert dead.original_exchange == "exchange.platform.events"
    assert dead.original_routing_key == "usercreated"
    assert dead.body == body
    assert dead.envelope == ENVELOPE
    assert dead.headers["x-partition-key"] == "usr_1"
    assert (dead.correlation_id, dead.timestamp, dead.priority) == ("cor_1", T0, 3)


def test_reads_header_values_aio_pika_gives_as_bytes() -> None:
    headers = banyan_record(
        **{
            "x-banyan-reason": b"timeout",
            "x-banyan-exception-message": b"\xff not utf-8",
            "x-attempt": b"3",
            "x-version": "2",
            "x-banyan-last-failure": T1.replace(tzinfo=None),  # an AMQP timestamp, naive
        }
    )
    dead = DeadLetter.from_delivery(FakeDelivery(b"{}", headers))
    assert dead.reason == "timeout"
    assert dead.exception_message == "\ufffd not utf-8"
    assert dead.attempts == 3
    assert dead.version == 2
    assert dead.last_failure == T1


@pytest.mark.parametrize(
    ("x_death_reason", "reason"),
    [
        ("rejected", "rejected"),
        ("delivery_limit", "delivery-limit"),
        ("expired", "expired"),
        ("maxlen", "max-length"),
        ("some_future_reason", "some-future-reason"),
    ],
)
def test_reads_a_broker_dead_letter(x_death_reason: str, reason: str) -> None:
    dead = DeadLetter.from_delivery(
        FakeDelivery(json.dumps(ENVELOPE).encode(), broker_record(x_death_reason)),
        group="email",
    )
    assert dead.source == "broker"
    assert dead.reason == reason
    assert dead.exception_type is dead.exception_message is dead.traceback is dead.handler is None
    assert dead.attempts == 1
    assert dead.first_failure == dead.last_failure == T1
    assert dead.group == "email"  # from the queue's name: the broker does not say
    assert dead.original_exchange == "exchange.platform.events.email.usercreated"
    assert dead.original_routing_key == "usercreated"
    assert dead.message_id == "evt_1"  # no AMQP message_id: the envelope's id
    assert dead.message_type == "UserCreated"
    assert dead.version == 1  # the x-version header wins over the body


def test_broker_record_keeps_the_retry_history() -> None:
    headers = broker_record(
        "rejected", **{"x-attempt": 4, "x-banyan-first-failure": "2025-11-15T10:30:00.123Z"}
    )
    dead = DeadLetter.from_delivery(FakeDelivery(b"{}", headers))
    assert (dead.attempts, dead.first_failure, dead.last_failure) == (4, T0, T1)


def test_the_later_of_two_records_wins() -> None:
    # Dead-lettered by us at T0, moved back by hand, then rejected by the broker at T1.
    headers = {
        **broker_record("delivery_limit"),
        **banyan_record(**{"x-banyan-last-failure": "2025-11-15T10:30:00.123Z"}),
    }
    assert DeadLetter.from_delivery(FakeDelivery(b"{}", headers)).reason == "delivery-limit"
    headers["x-banyan-last-failure"] = "2025-11-15T11:00:00Z"
    assert DeadLetter.from_delivery(FakeDelivery(b"{}", headers)).reason == "handler-failed"


@pytest.mark.parametrize("body", [b"\x00\xffnot json", b"[1, 2]", b'"text"', b"", b"[" * 100_000])
def test_a_body_that_is_not_a_json_object_has_no_envelope(body: bytes) -> None:
    dead = DeadLetter.from_delivery(FakeDelivery(body, {}))
    assert dead.envelope is None
    assert dead.body == body
    assert (dead.source, dead.reason, dead.attempts) == ("unknown", "unknown", 1)
    assert dead.message_id is None
    assert dead.ref.startswith("sha256:")
    assert len(dead.ref) == len("sha256:") + 16
    assert DeadLetter.from_delivery(FakeDelivery(body, {})).ref == dead.ref


@pytest.mark.parametrize(
    "garbage",
    [
        {"x-death": "not a list"},
        {"x-death": [1, 2]},
        {"x-death": [{"reason": 7, "time": "yesterday", "routing-keys": "k"}]},
        {"x-attempt": -3, "x-banyan-reason": 12, "x-banyan-first-failure": "soon"},
        {"x-attempt": True, "x-version": [1]},
    ],
)
def test_garbage_headers_never_raise(garbage: Headers) -> None:
    dead = DeadLetter.from_delivery(FakeDelivery(b"{", garbage))
    assert dead.attempts == 1
    assert dead.reason == "unknown"
    assert dead.first_failure is None or dead.first_failure.tzinfo is not None


def test_replay_message_is_the_original_with_the_failure_record_removed() -> None:
    headers = {**banyan_record(), **broker_record("rejected"), "x-delivery-count": 4}
    headers["x-custom"] = "kept"
    body = json.dumps(ENVELOPE).encode()
    dead = DeadLetter.from_delivery(
        FakeDelivery(body, headers, message_id="evt_1", message_type="UserCreated", priority=3)
    )
    message = dead.replay_message()
    assert message.body == body
    assert message.message_id == "evt_1"
    assert message.message_type == "UserCreated"
    assert (message.correlation_id, message.timestamp, message.priority) == ("cor_1", T0, 3)
    assert message.persistent
    assert message.headers == {
        "x-version": 1,
        "traceparent": headers["traceparent"],
        "x-partition-key": "usr_1",
        "x-custom": "kept",
    }  # x-banyan-handled dropped: a replay runs every handler (issue 16 §3)
    kept = dead.replay_message(keep_progress=True)
    assert kept.headers == {**message.headers, "x-banyan-handled": ["email.handlers.audit"]}
    assert dead.handled == ["email.handlers.audit"]


def test_replay_message_of_an_envelope_without_amqp_id_carries_the_envelope_id() -> None:
    dead = DeadLetter.from_delivery(FakeDelivery(json.dumps(ENVELOPE).encode(), {}))
    assert dead.replay_message().message_id == "evt_1"


def test_dead_letter_queue_names_the_group_queue_and_exchange() -> None:
    dlq = DeadLetterQueue(MemoryTransport("memory://unit-dlq-names"), "email", CrateWeighed)
    assert dlq.name == "dlq.exchange.platform.events.email.crateweighed"
    assert dlq.target_exchange == "exchange.platform.events.email.crateweighed"
    assert DeadLetterQueue(dlq.transport, "email", "CrateWeighed").name == dlq.name
    with pytest.raises(ValueError, match="subscription_group"):
        DeadLetterQueue(dlq.transport, "bad.group", CrateWeighed)


def test_a_record_the_engine_writes_reads_back_as_ours() -> None:
    try:
        raise ValueError("smtp said no")
    except ValueError as exc:
        error = exc
    delivery = FakeDelivery(
        json.dumps(ENVELOPE).encode(),
        {
            **broker_record("rejected"),
            "x-version": 2,
            "x-banyan-first-failure": "2025-11-15T10:30:00Z",
        },
        message_id="evt_1",
    )
    headers = record_headers(
        delivery, "handler-failed", exc=error, handler="email.send", group="email", attempt=4
    )
    assert not {"x-death", "x-first-death-reason", "x-first-death-queue"} & set(headers)
    dead = DeadLetter.from_delivery(FakeDelivery(delivery.body, headers, message_id="evt_1"))
    assert (dead.source, dead.reason, dead.attempts) == ("banyan", "handler-failed", 4)
    assert (dead.exception_type, dead.exception_message) == ("ValueError", "smtp said no")
    assert dead.traceback is not None
    assert dead.traceback.endswith("ValueError: smtp said no\n")
    assert (dead.handler, dead.group, dead.version) == ("email.send", "email", 2)
    assert dead.original_routing_key == delivery.routing_key
    assert dead.first_failure == datetime(2025, 11, 15, 10, 30, tzinfo=UTC)  # kept from retries
    assert dead.last_failure is not None
    assert dead.last_failure > dead.first_failure


def test_retries_records_and_replays_copy_a_message_through_one_function() -> None:
    """``republish`` makes every copy: a value another client wrote and aio-pika cannot
    write back (non-UTF-8 text, a double beyond float32) is turned into text, so a
    replay cannot wedge on it any more than a retry or a record could."""
    foreign: Headers = {"x-raw": b"\xff caf\xe9", "x-wide": 1e300, "x-list": [b"\xff"]}
    delivery = FakeDelivery(b"{}", dict(foreign), message_id="m1", priority=2)
    copy = republish(delivery, delivery.headers)
    assert copy.headers == {"x-raw": "\\xff caf\\xe9", "x-wide": "1e+300", "x-list": ["\\xff"]}
    assert (copy.body, copy.message_id, copy.priority) == (b"{}", "m1", 2)
    assert copy.content_type == "application/json"
    dead = DeadLetter.from_delivery(FakeDelivery(b"{}", {**broker_record("expired"), **foreign}))
    assert dead.replay_message().headers == {**copy.headers, "x-version": 1}


def test_the_record_format_has_one_home() -> None:
    """The engine and the DLQ tooling share the format through ``deadletter`` alone:
    neither of those two imports the engine."""
    import banyan_bus.consume

    for module in (deadletter, banyan_bus.dlq):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        imported: set[str | None] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        assert "banyan_bus.consume" not in imported, module.__name__
    assert banyan_bus.consume.republish is deadletter.republish
    assert banyan_bus.consume.write_record is deadletter.write_record
