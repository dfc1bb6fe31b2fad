"""Hostile publishers for tests: AMQP content headers written byte by byte.

pamqp refuses to marshal most of what a hostile publisher sends (a ``type`` that
is not UTF-8, a timestamp past year 9999, a header table nested thousands deep),
but the broker accepts it, because it passes content headers through as bytes.
:class:`RawProperties` is a ``Basic.Properties`` whose ``marshal()`` returns
bytes built here, so aiormq's own ``basic_publish`` (with confirms) sends them
as they are: the method and body frames are aiormq's, the content header's
property part is ours.

Build the property bytes with :func:`properties`; the ``*_raw`` arguments take
bytes exactly as they go on the wire.
"""

from __future__ import annotations

import struct
from types import TracebackType
from typing import Self

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp import encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

_FLAGS = spec.Basic.Properties.flags


def shortstr(raw: bytes) -> bytes:
    """An AMQP short string of ``raw`` bytes (no UTF-8 check)."""
    assert len(raw) <= 255
    return bytes([len(raw)]) + raw


def table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A field table from (raw key, type tag + encoded value) pairs."""
    body = b"".join(shortstr(key) + value for key, value in entries)
    return struct.pack(">I", len(body)) + body


def longstr_value(text: str) -> bytes:
    """A field-table value: ``S`` + a long string."""
    data = text.encode()
    return b"S" + struct.pack(">I", len(data)) + data


def int_value(number: int) -> bytes:
    """A field-table value: ``I`` + a signed 32-bit integer."""
    return b"I" + struct.pack(">i", number)


def nested_table(depth: int, *, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A header table whose key ``deep`` holds a table nested ``depth`` levels deep
    (built from the inside out, so building it does not recurse), next to ``extra``."""
    inner = struct.pack(">I", 0)
    for _ in range(depth):
        entry = shortstr(b"d") + b"F" + inner
        inner = struct.pack(">I", len(entry)) + entry
    return table([(b"deep", b"F" + inner), *(extra or [])])


def properties(
    *,
    content_type: bytes | None = b"application/json",
    headers_raw: bytes | None = None,
    headers: dict[str, object] | None = None,
    delivery_mode: int | None = 2,
    priority: int | None = None,
    correlation_id: bytes | None = None,
    message_id: bytes | None = None,
    timestamp: int | None = None,
    type_raw: bytes | None = None,
) -> bytes:
    """The property part of a content header (flags, then the values in AMQP order)."""
    if headers is not None:
        assert headers_raw is None
        headers_raw = encode.field_table(headers)  # type: ignore[arg-type]
    flags = 0
    parts: list[bytes] = []
    if content_type is not None:
        flags |= _FLAGS["content_type"]
        parts.append(shortstr(content_type))
    if headers_raw is not None:
        flags |= _FLAGS["headers"]
        parts.append(headers_raw)
    if delivery_mode is not None:
        flags |= _FLAGS["delivery_mode"]
        parts.append(bytes([delivery_mode]))
    if priority is not None:
        flags |= _FLAGS["priority"]
        parts.append(bytes([priority]))
    if correlation_id is not None:
        flags |= _FLAGS["correlation_id"]
        parts.append(shortstr(correlation_id))
    if message_id is not None:
        flags |= _FLAGS["message_id"]
        parts.append(shortstr(message_id))
    if timestamp is not None:
        flags |= _FLAGS["timestamp"]
        parts.append(struct.pack(">Q", timestamp))
    if type_raw is not None:
        flags |= _FLAGS["message_type"]
        parts.append(shortstr(type_raw))
    return struct.pack(">H", flags) + b"".join(parts)


class RawProperties(spec.Basic.Properties):
    """Properties that aiormq writes as the given bytes."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes, message_id: str | None = None) -> None:
        super().__init__(message_id=message_id)  # aiormq reads it, nothing else
        self._raw = raw

    def marshal(self) -> bytes:
        return self._raw


class RawPublish(spec.Basic.Publish):
    """A ``Basic.Publish`` written as the given bytes (exchange and routing key unchecked)."""

    __slots__ = ("_raw",)

    def __init__(self, exchange: bytes, routing_key: bytes) -> None:
        super().__init__()
        self._raw = struct.pack(">H", 0) + shortstr(exchange) + shortstr(routing_key) + b"\x00"

    def marshal(self) -> bytes:
        return self._raw


class FramePublisher:
    """An aiormq connection and a confirm channel that publish hand-built properties."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._plain: aiormq.abc.AbstractChannel

    async def __aenter__(self) -> Self:
        self._connection = await aiormq.connect(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._plain = await self._connection.channel(publisher_confirms=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, raw_properties: bytes
    ) -> None:
        """Publish and wait for the broker's confirmation (an ack, or fail)."""
        assert self._channel is not None
        confirmation = await self._channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=RawProperties(raw_properties),
        )
        assert isinstance(confirmation, spec.Basic.Ack), confirmation

    async def publish_raw_routing_key(
        self, exchange: str, routing_key: bytes, body: bytes, raw_properties: bytes
    ) -> None:
        """Publish with a routing key of raw bytes (frames written by hand, no confirm:
        aiormq's confirm bookkeeping cannot see this publish), then wait for a
        synchronous reply on the same channel, which the broker sends after it has
        processed the publish."""
        frames = [
            RawPublish(exchange.encode(), routing_key),
            ContentHeader(body_size=len(body), properties=RawProperties(raw_properties)),
            ContentBody(body),
        ]
        await self._plain.write_queue.put(  # type: ignore[attr-defined]
            ChannelFrame.marshall(frames=frames, channel_number=self._plain.number)
        )
        await self._plain.basic_qos(prefetch_count=0)
