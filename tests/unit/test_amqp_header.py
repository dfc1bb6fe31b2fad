"""The one-pass content-header decoder gives what pamqp gives, or leaves the frame to pamqp."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import encode
from pamqp.header import ContentHeader

from banyan_bus.transport import amqp_frames, amqp_header
from banyan_bus.transport.amqp_properties import marshal_properties
from banyan_bus.transport.base import OutgoingMessage

amqp_frames.install()  # as AmqpTransport.connect does; it records pamqp's own step
assert amqp_frames._strict is not None
_PAMQP = amqp_frames._strict


def _frame(properties: bytes, body_size: int = 42) -> bytes:
    return struct.pack(">HHQ", spec.Basic.frame_id, 0, body_size) + properties


def _same(left: ContentHeader, right: ContentHeader) -> None:
    assert (left.class_id, left.weight, left.body_size) == (
        right.class_id,
        right.weight,
        right.body_size,
    )
    for name in spec.Basic.Properties.__slots__:
        mine, theirs = getattr(left.properties, name), getattr(right.properties, name)
        assert mine == theirs, name
        assert type(mine) is type(theirs), name
    if left.properties.headers is not None:
        for key, value in left.properties.headers.items():
            assert type(value) is type(right.properties.headers[key]), key


def _banyan_message(**overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "body": b"{}",
        "message_id": "2f0b6c1e-8a51-4df1-9a3c-0d5a7c6f9e11",
        "correlation_id": "9b1c5e0a-0f44-4a7e-8d62-3c1e2b7f4a90",
        "message_type": "OrderPlaced",
        "timestamp": datetime(2026, 12, 6, 4, 30, 12, tzinfo=UTC),
        "headers": {
            "x-version": 2,
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        "priority": 0,
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def test_what_the_bus_sends_takes_the_fast_path_and_reads_as_pamqp_reads_it() -> None:
    frame = _frame(marshal_properties(_banyan_message()))
    _same(amqp_header.decode(frame), _PAMQP(frame))
    # and through the installed step, which is what aiormq calls
    _same(amqp_frames.unmarshal_content_header(frame), _PAMQP(frame))


_short = st.text(max_size=30)
_key = st.text(min_size=1, max_size=12).filter(lambda key: len(key.encode()) <= 128)
_flat_values: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=40),
    st.booleans(),
)
_any_values: st.SearchStrategy[Any] = st.one_of(
    _flat_values,
    st.floats(min_value=-1e30, max_value=1e30),  # pamqp writes a float as 4 bytes
    st.lists(st.integers(min_value=-100, max_value=100), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 9), max_size=2),
    st.binary(max_size=8).map(bytearray),
)


@given(
    content_type=st.one_of(st.none(), _short),
    content_encoding=st.one_of(st.none(), _short),
    headers=st.one_of(st.none(), st.dictionaries(_key, _any_values, max_size=4)),
    delivery_mode=st.one_of(st.none(), st.sampled_from([1, 2])),
    priority=st.one_of(st.none(), st.integers(0, 255)),
    correlation_id=st.one_of(st.none(), _short),
    reply_to=st.one_of(st.none(), _short),
    expiration=st.one_of(st.none(), st.integers(0, 10**9).map(str)),
    message_id=st.one_of(st.none(), _short),
    seconds=st.one_of(st.none(), st.integers(0, 2**34)),
    message_type=st.one_of(st.none(), _short),
    user_id=st.one_of(st.none(), _short),
    app_id=st.one_of(st.none(), _short),
)
def test_any_header_pamqp_writes_decodes_as_pamqp_decodes_it_or_is_left_to_pamqp(
    seconds: int | None, **fields: Any
) -> None:
    properties = spec.Basic.Properties(
        timestamp=None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC),
        **fields,
    )
    frame = _frame(properties.marshal())
    expected = _PAMQP(frame)
    try:
        decoded = amqp_header.decode(frame)
    except Exception:  # left to pamqp: allowed only for what the fast path does not take on
        headers = fields["headers"] or {}
        unusual_value = any(type(value) not in (int, str, bool) for value in headers.values())
        assert unusual_value or (seconds is not None and seconds > 0xFFFFFFFF)
    else:
        _same(decoded, expected)
    _same(amqp_frames.unmarshal_content_header(frame), expected)


@given(headers=st.dictionaries(_key, _flat_values, max_size=6))
def test_flat_tables_of_strings_integers_and_booleans_take_the_fast_path(
    headers: dict[str, Any],
) -> None:
    frame = _frame(spec.Basic.Properties(headers=headers or None).marshal())
    _same(amqp_header.decode(frame), _PAMQP(frame))


def _table_frame(entries: bytes) -> bytes:
    flags = spec.Basic.Properties.flags["headers"]
    return _frame(struct.pack(">HI", flags, len(entries)) + entries)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (_frame(b"\x80\x01"), "continued flag words"),
        (_frame(struct.pack(">H", 0x8000) + b"\x05abc"), "short string cut short"),
        (_frame(struct.pack(">H", 0x8000) + b"\x02\xff\xfe"), "short string not UTF-8"),
        (_frame(struct.pack(">HQ", 0x0040, 2**40)), "millisecond timestamp"),
        (_table_frame(b"\x01kS\x00\x00\x00\x02\xff\xfe"), "long string not UTF-8"),
        (_table_frame(b"\x01kS\x00\x00\x00\x09ab"), "long string cut short"),
        (_table_frame(b"\x01kF" + encode.field_table({"a": 1})), "nested table"),
        (_table_frame(b"\x01kd" + struct.pack(">d", 1.5)), "a double"),
        (_table_frame(b"\x01kl\x00\x00"), "integer cut short"),
        (_table_frame(b"\x05k"), "key cut short"),
        (_frame(struct.pack(">HI", 0x2000, 99)), "table longer than the frame"),
    ],
)
def test_anything_unusual_is_left_to_pamqp(frame: bytes, why: str) -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 - any exception means "pamqp's turn"
        amqp_header.decode(frame)
    # the installed step still answers: pamqp's decoding, or the tolerant one when pamqp fails
    content = amqp_frames.unmarshal_content_header(frame)
    assert content.body_size == 42, why
