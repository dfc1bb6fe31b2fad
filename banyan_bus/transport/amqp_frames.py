"""A content-header decoder that never takes the connection down.

**Why.** The broker passes a message's content header (its AMQP properties)
through as the publisher wrote it, and it accepts much that pamqp, the frame
codec under aiormq, cannot read back: a ``timestamp`` of 2^63-1 (pamqp builds a
``datetime`` and gets "year 292278994 is out of range"), a ``type``, id or
header key that is not UTF-8, a timestamp inside the headers past year 9999, a
header table nested 3,000 deep (``RecursionError``). aiormq decodes every frame
in its connection's reader task (``FrameReceiver.get_frame`` calls
``pamqp.frame.unmarshal``); when that raises, the reader dies and the *whole
connection* closes: every consumer and publisher of the process stops, the
broker requeues the message, and after the reconnect it kills the connection
again — on a classic queue for ever. One hostile publisher could stop every
service subscribed to its events, and ``basic.get`` on a DLQ holding such a
message failed the same way, so the DLQ could not even be listed.

**What.** :func:`install` replaces pamqp's content-header step
(``pamqp.frame._unmarshal_header_frame``, which ``pamqp.frame.unmarshal``
calls for frames of type 2 only) with :func:`unmarshal_content_header`. That
tries the one-pass decoder of :mod:`banyan_bus.transport.amqp_header` first
(the bus's own messages, in less than half of pamqp's time), then pamqp's own
decoder (what the fast path leaves alone: nested headers such as ``x-death``, a
few µs more than before). Only when pamqp raises — whatever it raises — or a
header value is nested deeper than :data:`MAX_HEADER_DEPTH`, it decodes the
properties again one by one and keeps every field it can:

- a property that cannot be decoded (bad UTF-8 in a short string, a timestamp
  out of range) is left unset;
- a header entry whose key or value cannot be decoded, or whose value is
  nested too deep, is left out; the other entries are kept;
- if the property list cannot be walked past some point (an unknown field type,
  truncated data), the rest is left unset;
- the header :data:`HEADER_UNDECODABLE` (``x-banyan-undecodable``) is added,
  a short text naming each field that was dropped and why, e.g.
  ``timestamp: 9223372036854775807 is not a time (year 292278994 is out of
  range); headers['\\xff']: key is not UTF-8`` (raw bytes shown escaped).

The body size (the first 12 bytes) is always read exactly, so the body frames
that follow are read as usual and the connection stays in step. The frame's
delivery is then an ordinary one carrying the marker header; the envelope
decoder (``banyan_bus.envelope.decode``) refuses a delivery with the marker as
``undecodable``, so the consumer dead-letters it — raw body and surviving
headers, plus the marker — and everything else goes on. The DLQ tooling reads
such a record like any other and shows the marker among its headers.

Only a content header whose first 12 bytes are missing (which no broker sends:
it is not a frame) still raises, as before.

**Routing keys.** The broker also accepts a routing key that is not UTF-8, and
routes it (a group's exchange is a fanout), so the ``Basic.Deliver`` (or
``Basic.GetOk``, ``Basic.Return``) announcing the message cannot be decoded
either. :func:`install` therefore also wraps pamqp's method-frame step: when
pamqp fails on one of those three methods, its short strings (exchange, routing
key, consumer tag, reply text) are decoded with undecodable bytes escaped
(``\\xff``). The routing key has done its work by then (the broker routed the
message), so the delivery is handled as usual; only its ``routing_key`` shows
the escaped form.

**Scope.** pamqp has one decoder per process, so installing this changes it
for every aiormq connection of the process — but only for frames that would
otherwise have closed the connection. ``AmqpTransport.connect`` installs it;
calling :func:`install` again does nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.frame
from pamqp import commands as spec
from pamqp import decode, header

from banyan_bus.transport import amqp_header

HEADER_UNDECODABLE = "x-banyan-undecodable"
"""Added to the headers of a delivery whose properties could not all be decoded."""

MAX_HEADER_DEPTH = 32
"""Header values nested deeper than this (tables in tables, arrays in arrays) are dropped:
nothing in the bus needs more than a few levels (``x-death`` has three), and every
recursive reader or writer of headers further on (logging, re-publishing to a DLQ) must
stay clear of Python's recursion limit."""

_DETAIL_LIMIT = 2000  # characters of the marker text
_REPR_LIMIT = 80  # characters of one offending value shown in it

_Strict = Callable[[bytes], header.ContentHeader]
_strict: _Strict | None = None
_StrictMethod = Callable[[bytes], Any]
_strict_method: _StrictMethod | None = None
_LENIENT_METHODS = {
    method.index: method for method in (spec.Basic.Deliver, spec.Basic.GetOk, spec.Basic.Return)
}

# Encoded sizes of field-table values after their type tag; None = 4-byte length prefix.
_FIXED_SIZES: dict[int, int | None] = {
    ord("t"): 1,
    ord("b"): 1,
    ord("B"): 1,
    ord("s"): 2,
    ord("u"): 2,
    ord("I"): 4,
    ord("i"): 4,
    ord("l"): 8,
    ord("L"): 8,
    ord("f"): 4,
    ord("d"): 8,
    ord("D"): 5,
    ord("T"): 8,
    ord("V"): 0,
    0: 0,
    ord("S"): None,
    ord("A"): None,
    ord("F"): None,
    ord("x"): None,
}
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PROPERTIES = spec.Basic.Properties


def install() -> None:
    """Make pamqp (and so aiormq) decode content headers with :func:`unmarshal_content_header`
    and method frames with :func:`unmarshal_method`. Idempotent."""
    global _strict, _strict_method
    current = getattr(pamqp.frame, "_unmarshal_header_frame", None)
    current_method = getattr(pamqp.frame, "_unmarshal_method_frame", None)
    if current is None or current_method is None:  # pragma: no cover - a pamqp refactoring
        raise RuntimeError(
            "pamqp.frame._unmarshal_header_frame or _unmarshal_method_frame is gone: "
            "banyan_bus cannot install its tolerant frame decoder on this pamqp version"
        )
    if current is not unmarshal_content_header:
        _strict = current
        pamqp.frame._unmarshal_header_frame = unmarshal_content_header
    if current_method is not unmarshal_method:
        _strict_method = current_method
        pamqp.frame._unmarshal_method_frame = unmarshal_method


def installed() -> bool:
    return (
        getattr(pamqp.frame, "_unmarshal_header_frame", None) is unmarshal_content_header
        and getattr(pamqp.frame, "_unmarshal_method_frame", None) is unmarshal_method
    )


def unmarshal_method(frame_data: bytes) -> Any:
    """pamqp's decoding of a method frame; for a delivery whose exchange, routing key or
    other short string is not UTF-8, the same with those bytes escaped."""
    strict = _strict_method
    assert strict is not None, "install() records pamqp's decoder first"
    try:
        return strict(frame_data)
    except Exception as exc:
        method = (
            _LENIENT_METHODS.get(_U32.unpack_from(frame_data)[0]) if len(frame_data) >= 4 else None
        )
        if method is None:
            raise
        try:
            return _decode_method_leniently(method(), frame_data[4:])
        except Exception:
            raise exc from None


def _decode_method_leniently(method: Any, data: bytes) -> Any:
    """``base.Frame.unmarshal`` with short strings decoded leniently."""
    offset, processing_bitset = 0, False
    for argument in method.__slots__:
        data_type = method.amqp_type(argument)
        value: Any
        if processing_bitset and (data_type != "bit" or offset == 8):
            data = data[1:]
            offset = 0
            processing_bitset = False
        if data_type == "shortstr":
            size = 1 + data[0]
            if len(data) < size:
                raise ValueError(f"{argument}: truncated")
            consumed, value = size, data[1:size].decode("utf-8", "backslashreplace")
        else:
            consumed, value = decode.by_type(data, data_type, offset)
        if data_type == "bit":
            offset += 1
            processing_bitset = True
            consumed = 0
        setattr(method, argument, value)
        if consumed:
            data = data[consumed:]
    return method


def unmarshal_content_header(frame_data: bytes) -> header.ContentHeader:
    """The one-pass decoding of a content header frame's payload, else pamqp's, else the
    tolerant one."""
    try:
        return amqp_header.decode(frame_data)
    except Exception:  # anything unusual is pamqp's (and then the tolerant step's) to decode
        pass
    strict = _strict
    assert strict is not None, "install() records pamqp's decoder first"
    try:
        content = strict(frame_data)
    except Exception as exc:  # whatever pamqp raised: decode field by field
        return decode_tolerantly(frame_data, exc)
    headers = content.properties.headers
    if headers and _nested(headers) and _too_deep(headers):
        return decode_tolerantly(frame_data, None)
    return content


def decode_tolerantly(frame_data: bytes, error: BaseException | None) -> header.ContentHeader:
    """Decode what can be decoded of a content header; name what could not in the marker."""
    try:
        class_id, weight, body_size = struct.unpack(">HHQ", frame_data[0:12])
    except struct.error:
        if error is not None:
            raise error from None
        raise
    properties = _PROPERTIES()
    problems: list[str] = []
    try:
        offset, flags = header.ContentHeader._get_flags(frame_data[12:])
    except ValueError as exc:
        problems.append(f"property flags: {exc}")
    else:
        _decode_properties(properties, flags, frame_data, 12 + offset, problems)
    if not problems:  # pamqp failed where we did not: say so rather than pass it silently
        problems.append(f"properties: {_describe(error) if error else 'not decodable'}")
    detail = "; ".join(problems)
    if len(detail) > _DETAIL_LIMIT:
        detail = detail[: _DETAIL_LIMIT - 1] + "…"
    headers: dict[str, Any] = dict(properties.headers or {})
    headers[HEADER_UNDECODABLE] = detail
    properties.headers = headers
    content = header.ContentHeader(weight=weight, body_size=body_size, properties=properties)
    content.class_id = class_id
    return content


def _decode_properties(
    properties: spec.Basic.Properties,
    flags: int,
    data: bytes,
    offset: int,
    problems: list[str],
) -> None:
    for name in properties.__slots__:
        if not flags & _PROPERTIES.flags[name]:
            continue
        kind = getattr(_PROPERTIES, "_" + name)
        end = len(data)
        if kind == "shortstr":
            if offset >= end:
                return _truncated(name, problems)
            size = 1 + data[offset]
            raw = data[offset + 1 : offset + size]
            if offset + size > end:
                return _truncated(name, problems)
            try:
                setattr(properties, name, raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.append(f"{name}: not UTF-8: {_show(raw)}")
        elif kind == "octet":
            if offset + 1 > end:
                return _truncated(name, problems)
            size = 1
            setattr(properties, name, data[offset])
        elif kind == "timestamp":
            size = 8
            if offset + size > end:
                return _truncated(name, problems)
            try:
                _, value = decode.timestamp(data[offset : offset + size])
            except (ValueError, OverflowError, OSError) as exc:
                raw_value = _U64.unpack_from(data, offset)[0]
                problems.append(f"{name}: {raw_value} is not a time ({_describe(exc)})")
            else:
                properties.timestamp = value
        elif kind == "table":
            if offset + 4 > end:
                return _truncated(name, problems)
            size = 4 + _U32.unpack_from(data, offset)[0]
            if offset + size > end:
                return _truncated(name, problems)
            properties.headers = _decode_table(data, offset + 4, offset + size, problems)
        else:  # pragma: no cover - Basic.Properties has no other kinds
            problems.append(f"{name}: unknown property kind {kind!r}; the rest is left out")
            return None
        offset += size
    return None


def _decode_table(data: bytes, offset: int, end: int, problems: list[str]) -> dict[str, Any]:
    """The entries of the headers table in ``data[offset:end]`` that decode; the rest named."""
    table: dict[str, Any] = {}
    while offset < end:
        key_size = data[offset]
        raw_key = data[offset + 1 : offset + 1 + key_size]
        offset += 1 + key_size
        size = _value_size(data, offset, end)
        if size is None:
            problems.append(
                f"headers[{_show(raw_key)}]: unknown field type or truncated value; "
                f"it and the entries after it are left out"
            )
            break
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"headers[{_show(raw_key)}]: key is not UTF-8")
            offset += size
            continue
        try:
            _, value = decode.embedded_value(data[offset : offset + size])
        except RecursionError:
            problems.append(f"headers[{key!r}]: nested deeper than {MAX_HEADER_DEPTH} levels")
        except Exception as exc:  # pamqp's value decoders raise various
            problems.append(f"headers[{key!r}]: {_describe(exc)}")
        else:
            if isinstance(value, (dict, list)) and _too_deep(value):
                problems.append(f"headers[{key!r}]: nested deeper than {MAX_HEADER_DEPTH} levels")
            else:
                table[key] = value
        offset += size
    return table


def _value_size(data: bytes, offset: int, end: int) -> int | None:
    """Bytes taken by the tagged field value at ``offset``, or None when unknown."""
    if offset >= end:
        return None
    fixed = _FIXED_SIZES.get(data[offset], -1)
    if fixed == -1:
        return None
    if fixed is None:
        if offset + 5 > end:
            return None
        size = 5 + _U32.unpack_from(data, offset + 1)[0]
    else:
        size = 1 + fixed
    return size if offset + size <= end else None


def _nested(table: dict[str, Any]) -> bool:
    for value in table.values():
        if type(value) is dict or type(value) is list:
            return True
    return False


def _too_deep(value: Any, limit: int = MAX_HEADER_DEPTH) -> bool:
    """Whether ``value`` nests tables or arrays more than ``limit`` levels (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _truncated(name: str, problems: list[str]) -> None:
    problems.append(f"{name}: truncated; it and the properties after it are left out")


def _show(raw: bytes) -> str:
    """``raw`` quoted, every byte outside printable ASCII escaped (safe on a terminal)."""
    text = repr(raw)[1:]
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 1] + "…"


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    text = str(cause) or type(cause).__name__
    if isinstance(cause, RecursionError):
        text = "nested too deep to decode"
    return text[:200]
