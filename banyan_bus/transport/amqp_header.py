"""Content headers decoded in one pass, for the deliveries the bus itself sends.

pamqp decodes a content header generically: per property a lookup of its type by
name and a dispatch on the type string, per header value a copy of the rest of the
frame (``value[offset:]``) and another dispatch. For banyan's envelope (eight
properties and a header table holding ``x-version`` and ``traceparent``) that cost
about 10 µs per delivery here, against 4 µs for aio-pika's usual three properties:
the largest cost of a consumed message after the handler's own work
(benchmarks/README.md, "the aiormq floor").

:func:`decode` reads the properties in one pass with offsets into the frame and
decodes header values of the kinds banyan and most clients write (long strings,
integers, booleans) in place. It is a fast path and nothing more: whatever it does
not take on exactly as pamqp would — continued property flags, a millisecond
timestamp (pamqp divides those by 1,000), a string that is not UTF-8 (pamqp keeps
long strings as bytes), nested tables and arrays, any other value kind, anything
truncated — raises :class:`Unusual`, and the caller decodes the frame with pamqp
(and, where pamqp fails, tolerantly: ``amqp_frames``). A frame it does decode gives
the same ``ContentHeader`` pamqp gives (``tests/unit/test_amqp_header.py`` compares
them over generated headers).
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from pamqp import commands as spec
from pamqp import header

_PROPERTIES = spec.Basic.Properties
_CONTENT_HEADER = header.ContentHeader
_PREFIX = struct.Struct(">HHQH")  # class id, weight, body size, first flag word
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_MAX_SECONDS = 0xFFFFFFFF  # pamqp reads a larger timestamp as milliseconds

# Field-table value kinds decoded here, as pamqp decodes them (pamqp.decode.TABLE_MAPPING).
_INTEGERS: dict[int, tuple[struct.Struct, int]] = {
    ord(kind): (struct.Struct(fmt), struct.calcsize(fmt))
    for kind, fmt in (
        ("b", ">b"),
        ("B", ">B"),
        ("s", ">h"),
        ("u", ">H"),
        ("I", ">l"),
        ("i", ">L"),
        ("l", ">q"),
        ("L", ">q"),
    )
}
_LONG_STRING = ord("S")
_BOOLEAN = ord("t")

_SHORT_STRING, _OCTET, _TABLE, _TIMESTAMP = range(4)
_KINDS = {"shortstr": _SHORT_STRING, "octet": _OCTET, "table": _TABLE, "timestamp": _TIMESTAMP}
# (flag bit, attribute, kind) in the order the properties follow each other on the wire.
_LAYOUT = tuple(
    (_PROPERTIES.flags[name], name, _KINDS[getattr(_PROPERTIES, "_" + name)])
    for name in _PROPERTIES.__slots__
)
_SLOTS = tuple(_PROPERTIES.__slots__)


class Unusual(Exception):
    """The frame holds something this fast path leaves to pamqp."""


def decode(data: bytes) -> header.ContentHeader:
    """The content header in a header frame's payload, or :class:`Unusual`.

    Other exceptions (``struct.error``, ``IndexError``, ``UnicodeDecodeError``) also
    mean "leave it to pamqp": the caller treats every exception alike.
    """
    class_id, weight, body_size, flags = _PREFIX.unpack_from(data, 0)
    if flags & 1:
        raise Unusual("the property flags continue in a second word")
    # pamqp's Properties() would validate fourteen Nones; the attributes are set as its
    # constructor sets them, then the decoded ones over them.
    properties = _PROPERTIES.__new__(_PROPERTIES)
    for slot in _SLOTS:
        setattr(properties, slot, None)
    properties.cluster_id = ""
    offset = 14
    end = len(data)
    for flag, name, kind in _LAYOUT:
        if not flags & flag:
            continue
        if kind == _SHORT_STRING:
            stop = offset + 1 + data[offset]
            if stop > end:
                raise Unusual(f"{name} is truncated")
            setattr(properties, name, data[offset + 1 : stop].decode())
            offset = stop
        elif kind == _OCTET:
            setattr(properties, name, data[offset])
            offset += 1
        elif kind == _TIMESTAMP:
            seconds = _U64.unpack_from(data, offset)[0]
            if seconds > _MAX_SECONDS:
                raise Unusual(f"{name} is in milliseconds")
            properties.timestamp = datetime.fromtimestamp(seconds, tz=UTC)
            offset += 8
        else:
            stop = offset + 4 + _U32.unpack_from(data, offset)[0]
            if stop > end:
                raise Unusual(f"{name} is truncated")
            properties.headers = _table(data, offset + 4, stop)
            offset = stop
    content = _CONTENT_HEADER.__new__(_CONTENT_HEADER)
    content.class_id = class_id
    content.weight = weight
    content.body_size = body_size
    content.properties = properties
    return content


def _table(data: bytes, offset: int, end: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    while offset < end:
        stop = offset + 1 + data[offset]
        if stop >= end:
            raise Unusual("a header entry is truncated")
        key = data[offset + 1 : stop].decode()
        kind = data[stop]
        offset = stop + 1
        if kind == _LONG_STRING:
            stop = offset + 4 + _U32.unpack_from(data, offset)[0]
            if stop > end:
                raise Unusual(f"header {key!r} is truncated")
            table[key] = data[offset + 4 : stop].decode()
            offset = stop
            continue
        integer = _INTEGERS.get(kind)
        if integer is not None:
            codec, size = integer
            table[key] = codec.unpack_from(data, offset)[0]
            offset += size
        elif kind == _BOOLEAN:
            table[key] = bool(data[offset])
            offset += 1
        else:
            raise Unusual(f"header {key!r} is of kind {chr(kind)!r}")
        if offset > end:
            raise Unusual(f"header {key!r} is truncated")
    return table
