"""marshal_properties writes byte for byte what pamqp writes, and what pamqp reads back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.header import ContentHeader

from banyan_bus.transport.amqp_properties import WireProperties, marshal_properties
from banyan_bus.transport.base import OutgoingMessage


def _pamqp(message: OutgoingMessage) -> bytes:
    return spec.Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2 if message.persistent else 1,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.message_type,
        headers=message.headers or None,  # type: ignore[arg-type]
        expiration=None if message.expiration is None else str(message.expiration),
    ).marshal()


_text = st.text(min_size=0, max_size=40)
_header_values: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=-(2**62), max_value=2**62),
    st.text(max_size=20),
    st.booleans(),
    st.lists(st.integers(min_value=-100, max_value=100), max_size=3),
)


@given(
    message_id=st.one_of(st.none(), _text),
    correlation_id=st.one_of(st.none(), _text),
    message_type=st.one_of(st.none(), _text),
    reply_to=st.one_of(st.none(), _text),
    priority=st.one_of(st.none(), st.integers(min_value=0, max_value=9)),
    expiration=st.one_of(st.none(), st.integers(min_value=1, max_value=10**9)),
    persistent=st.booleans(),
    version=st.integers(min_value=1, max_value=300),
    extra=st.dictionaries(st.text(min_size=1, max_size=10), _header_values, max_size=3),
    seconds=st.integers(min_value=0, max_value=2**33),
)
def test_the_same_bytes_as_pamqp(
    message_id: str | None,
    correlation_id: str | None,
    message_type: str | None,
    reply_to: str | None,
    priority: int | None,
    expiration: int | None,
    persistent: bool,
    version: int,
    extra: dict[str, Any],
    seconds: int,
) -> None:
    message = OutgoingMessage(
        body=b"{}",
        message_id=message_id,
        correlation_id=correlation_id,
        message_type=message_type,
        reply_to=reply_to,
        priority=priority,
        expiration=expiration,
        persistent=persistent,
        timestamp=datetime.fromtimestamp(seconds, UTC),
        headers={"x-version": version, **extra},
    )
    assert marshal_properties(message) == _pamqp(message)


def test_the_common_envelope_round_trips_through_pamqp() -> None:
    sent = datetime(2026, 11, 25, 10, 30, 0, 123000, tzinfo=UTC)
    message = OutgoingMessage(
        body=b"{}",
        message_id="evt_1",
        correlation_id="cor_1",
        message_type="UserCreated",
        timestamp=sent,
        headers={"x-version": 2, "x-partition-key": "order-7"},
        priority=2,
    )
    wire = ContentHeader(0, 2, WireProperties(message)).marshal()
    header = ContentHeader()
    header.unmarshal(wire)
    props = header.properties
    assert props.message_id == "evt_1"
    assert props.correlation_id == "cor_1"
    assert props.message_type == "UserCreated"
    assert props.headers == {"x-version": 2, "x-partition-key": "order-7"}
    assert props.priority == 2
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    assert props.timestamp == sent.replace(microsecond=0)


def test_naive_and_offset_times_are_taken_as_pamqp_takes_them() -> None:
    for ts in (
        datetime(2026, 1, 1, 12),
        datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=3))),
    ):
        message = OutgoingMessage(body=b"", message_id="m", timestamp=ts)
        assert marshal_properties(message) == _pamqp(message)


def test_a_too_long_short_string_is_refused_with_its_size() -> None:
    message = OutgoingMessage(body=b"", message_id="x" * 256)
    with pytest.raises(ValueError, match="255 bytes, got 256"):
        marshal_properties(message)
