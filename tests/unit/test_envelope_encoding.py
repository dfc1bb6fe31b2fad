"""encode() writes the DESIGN §2 envelope, byte for byte what ``json.dumps`` of its head gives,
and decode() reads it back; its header is assembled by hand for speed, so check it hard."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from banyan_bus import Event
from banyan_bus.contracts import registry
from banyan_bus.envelope import decode, encode, format_timestamp
from banyan_bus.testing import Published, _Recorded


class LedgerPosted(Event):
    ledger_id: str
    amount_cents: int
    memo: str = ""


class LedgerPostedV2(Event, name="LedgerPosted", version=2):
    ledger_id: str
    amount_cents: int
    currency: str = "EUR"


def _expected(
    message: Event,
    *,
    message_id: str,
    correlation_id: str,
    causation_id: str | None,
    trace_context: dict[str, str] | None,
    timestamp: datetime,
    service_name: str,
    priority: str,
    metadata: dict[str, Any] | None,
) -> bytes:
    cls = type(message)
    head = {
        "id": message_id,
        "correlationId": correlation_id,
        "causationId": causation_id,
        "traceContext": trace_context,
        "timestamp": format_timestamp(timestamp),
        "serviceName": service_name,
        "messageType": cls.__message_type__,
        "version": cls.__message_version__,
        "metadata": {"routing": {"priority": priority}, **(metadata or {})},
    }
    # The payload is pydantic's JSON as it is (it may keep characters json.dumps escapes).
    payload = message.model_dump_json(by_alias=True).encode()
    return json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"payload":' + payload + b"}"


_text = st.text(max_size=30)


@given(
    memo=_text,
    message_id=_text,
    correlation_id=_text,
    causation_id=st.one_of(st.none(), _text),
    traced=st.booleans(),
    service_name=st.text(min_size=1, max_size=20),
    priority=st.sampled_from(["low", "normal", "high"]),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=8), _text, max_size=2)),
    v2=st.booleans(),
)
def test_the_body_is_what_json_dumps_writes(
    memo: str,
    message_id: str,
    correlation_id: str,
    causation_id: str | None,
    traced: bool,
    service_name: str,
    priority: Any,
    metadata: dict[str, Any] | None,
    v2: bool,
) -> None:
    message: Event = (
        LedgerPostedV2(ledger_id="l-1", amount_cents=-5, currency=memo[:3])
        if v2
        else LedgerPosted(ledger_id="l-1", amount_cents=1250, memo=memo)
    )
    trace = {"traceId": "a" * 32, "spanId": "b" * 16, "traceFlags": "01"} if traced else None
    timestamp = datetime(2026, 11, 25, 10, 30, 0, 123456, tzinfo=UTC)
    fields: dict[str, Any] = {
        "message_id": message_id,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "trace_context": trace,
        "timestamp": timestamp,
        "service_name": service_name,
        "priority": priority,
        "metadata": metadata,
    }
    assert encode(message, **fields).body == _expected(message, **fields)


def test_timestamps_are_utc_milliseconds_with_z() -> None:
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=UTC)) == (
        "2026-01-02T03:04:05.678Z"
    )
    plus_two = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=plus_two)) == (
        "2026-01-02T01:04:05.000Z"
    )


def test_a_default_envelope_decodes_to_what_was_sent() -> None:
    out = encode(
        LedgerPosted(ledger_id="l-9", amount_cents=7, memo="ünïcode ✓"), service_name="books"
    )
    # The test harness's view of a publish as a delivery: the decoder reads it as a consumer would.
    envelope = decode(_Recorded(Published("", "", out)), registry)
    assert envelope.payload == LedgerPosted(ledger_id="l-9", amount_cents=7, memo="ünïcode ✓")
    assert envelope.id == out.message_id
    assert envelope.correlation_id == out.correlation_id
    assert envelope.service_name == "books"
    assert out.timestamp is not None
    assert abs(envelope.timestamp - out.timestamp) < timedelta(milliseconds=1)
