"""The tolerant frame decoder (banyan_bus/transport/amqp_frames.py), without a broker."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp import constants
from pamqp.exceptions import UnmarshalingException

from banyan_bus.transport import amqp_frames
from banyan_bus.transport.amqp_frames import HEADER_UNDECODABLE, MAX_HEADER_DEPTH
from tests.hostile import (
    RawPublish,
    int_value,
    longstr_value,
    nested_table,
    properties,
    shortstr,
    table,
)

BODY_SIZE = 1234
VERSION_1 = [(b"x-version", int_value(1))]


@pytest.fixture(autouse=True)
def _installed() -> None:
    amqp_frames.install()


def header_frame(raw_properties: bytes, channel: int = 1) -> bytes:
    payload = struct.pack(">HHQ", spec.Basic.frame_id, 0, BODY_SIZE) + raw_properties
    return (
        struct.pack(">BHI", constants.FRAME_HEADER, channel, len(payload))
        + payload
        + constants.FRAME_END_CHAR
    )


def decode(raw_properties: bytes) -> spec.Basic.Properties:
    _, channel, frame = pamqp.frame.unmarshal(header_frame(raw_properties))
    assert channel == 1
    assert frame.body_size == BODY_SIZE  # type: ignore[union-attr]  # the body still follows
    return frame.properties  # type: ignore[union-attr, no-any-return]


def good(**overrides: object) -> bytes:
    base: dict[str, object] = {
        "headers_raw": table([*VERSION_1, (b"traceparent", longstr_value("00-ab-cd-01"))]),
        "message_id": b"evt_1",
        "correlation_id": b"cor_1",
        "timestamp": 1_763_202_600,
        "type_raw": b"CrateSealed",
        "priority": 2,
    }
    base.update(overrides)
    return properties(**base)  # type: ignore[arg-type]


def test_install_is_idempotent_and_hooks_pamqps_frame_decoder() -> None:
    amqp_frames.install()
    amqp_frames.install()
    assert amqp_frames.installed()


def test_good_properties_decode_as_pamqp_decodes_them() -> None:
    props = decode(good())
    assert props.message_id == "evt_1"
    assert props.message_type == "CrateSealed"
    assert props.timestamp == datetime.fromtimestamp(1_763_202_600, UTC)
    assert props.headers == {"x-version": 1, "traceparent": "00-ab-cd-01"}
    assert props.priority == 2
    assert props.delivery_mode == 2


def test_a_timestamp_out_of_range_is_dropped_and_named() -> None:
    props = decode(good(timestamp=2**63 - 1))
    assert props.timestamp is None
    assert props.message_type == "CrateSealed"  # the property after it is still read
    assert props.message_id == "evt_1"
    assert props.headers is not None
    assert props.headers["x-version"] == 1
    marker = props.headers[HEADER_UNDECODABLE]
    assert "timestamp: 9223372036854775807 is not a time" in marker
    assert "year 292278994 is out of range" in marker


def test_a_header_key_not_utf8_drops_that_entry_only() -> None:
    headers = table([(b"\xff\xfe", longstr_value("v")), *VERSION_1])
    props = decode(good(headers_raw=headers))
    assert props.headers == {
        "x-version": 1,
        HEADER_UNDECODABLE: "headers['\\xff\\xfe']: key is not UTF-8",
    }
    assert props.message_id == "evt_1"


def test_a_type_not_utf8_is_dropped_and_shown_escaped() -> None:
    props = decode(good(type_raw=b"Crate\xff\x1b[2JSealed"))
    assert props.message_type is None
    assert props.headers is not None
    marker = props.headers[HEADER_UNDECODABLE]
    assert marker == "message_type: not UTF-8: 'Crate\\xff\\x1b[2JSealed'"  # no raw escape codes


def test_a_header_table_nested_3000_deep_is_dropped() -> None:
    props = decode(good(headers_raw=nested_table(3000, extra=VERSION_1)))
    assert props.headers is not None
    assert props.headers["x-version"] == 1
    assert "deep" not in props.headers
    assert "headers['deep']: nested deeper than" in props.headers[HEADER_UNDECODABLE]


def test_nesting_pamqp_can_read_but_over_the_bound_is_dropped_too() -> None:
    props = decode(good(headers_raw=nested_table(MAX_HEADER_DEPTH + 5, extra=VERSION_1)))
    assert props.headers is not None
    assert "deep" not in props.headers
    assert HEADER_UNDECODABLE in props.headers
    shallow = decode(good(headers_raw=nested_table(MAX_HEADER_DEPTH - 2, extra=VERSION_1)))
    assert shallow.headers is not None
    assert "deep" in shallow.headers
    assert HEADER_UNDECODABLE not in shallow.headers


def test_a_header_timestamp_out_of_range_drops_that_entry() -> None:
    headers = table([(b"when", b"T" + struct.pack(">Q", 2**63 - 1)), *VERSION_1])
    props = decode(good(headers_raw=headers))
    assert props.headers is not None
    assert props.headers["x-version"] == 1
    assert "when" not in props.headers
    assert "headers['when']" in props.headers[HEADER_UNDECODABLE]


def test_an_unknown_field_type_drops_the_rest_of_the_table_only() -> None:
    headers = table([*VERSION_1, (b"odd", b"Z\x00\x01"), (b"after", int_value(2))])
    props = decode(good(headers_raw=headers, type_raw=b"Crate\xffSealed"))
    assert props.headers is not None
    assert props.headers["x-version"] == 1
    assert "after" not in props.headers
    assert props.message_id == "evt_1"  # properties after the headers are still read
    marker = props.headers[HEADER_UNDECODABLE]
    assert "headers['odd']: unknown field type" in marker
    assert "message_type: not UTF-8" in marker


def test_truncated_properties_keep_what_came_before() -> None:
    raw = good(timestamp=2**63 - 1)[:-5]  # the type's short string is cut
    props = decode(raw)
    assert props.message_id == "evt_1"
    assert props.message_type is None
    assert props.headers is not None
    marker = props.headers[HEADER_UNDECODABLE]
    assert "timestamp: 9223372036854775807" in marker
    assert "message_type: truncated" in marker


def test_a_frame_too_short_for_its_body_size_still_raises() -> None:
    payload = b"\x00\x3c\x00"
    frame = (
        struct.pack(">BHI", constants.FRAME_HEADER, 1, len(payload))
        + payload
        + constants.FRAME_END_CHAR
    )
    with pytest.raises(UnmarshalingException):
        pamqp.frame.unmarshal(frame)


def method_frame(method_index: int, arguments: bytes) -> bytes:
    payload = struct.pack(">I", method_index) + arguments
    return (
        struct.pack(">BHI", constants.FRAME_METHOD, 1, len(payload))
        + payload
        + constants.FRAME_END_CHAR
    )


def test_a_deliver_with_a_routing_key_not_utf8_is_read_with_the_key_escaped() -> None:
    arguments = (
        shortstr(b"ctag")
        + struct.pack(">Q", 7)
        + b"\x01"  # redelivered
        + shortstr(b"exchange.x")
        + shortstr(b"key-\xff")
    )
    _, _, frame = pamqp.frame.unmarshal(method_frame(spec.Basic.Deliver.index, arguments))
    assert isinstance(frame, spec.Basic.Deliver)
    assert frame.consumer_tag == "ctag"
    assert frame.delivery_tag == 7
    assert frame.redelivered is True
    assert frame.exchange == "exchange.x"
    assert frame.routing_key == "key-\\xff"


def test_a_get_ok_with_a_routing_key_not_utf8_is_read() -> None:
    arguments = (
        struct.pack(">Q", 3) + b"\x00" + shortstr(b"") + shortstr(b"\xfe") + struct.pack(">I", 9)
    )
    _, _, frame = pamqp.frame.unmarshal(method_frame(spec.Basic.GetOk.index, arguments))
    assert isinstance(frame, spec.Basic.GetOk)
    assert (frame.delivery_tag, frame.redelivered, frame.routing_key) == (3, False, "\\xfe")
    assert frame.message_count == 9


def test_other_methods_fail_as_before() -> None:
    raw = RawPublish(b"x", b"\xff").marshal()
    with pytest.raises(UnmarshalingException):
        pamqp.frame.unmarshal(method_frame(spec.Basic.Publish.index, raw))
