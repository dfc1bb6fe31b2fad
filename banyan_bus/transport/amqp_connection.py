"""Reaching the broker: which node, how often it must answer, and why it refused.

The RabbitMQ transport's connection concerns, apart from what it does once
connected: failing over along a list of cluster nodes (aio-pika reconnects only
to the URL it was given), the heartbeat that notices a half-open connection,
the channel budget a connection has, and turning a refused handshake into the
broker's own words.
"""

from __future__ import annotations

import re
import time
from typing import cast

from aio_pika import RobustConnection
from pamqp import commands as spec
from yarl import URL

from banyan_bus.errors import ConfigurationError


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection, reconnecting to the next node of a cluster.

    aio-pika reconnects to the URL it was given; with a node down for good that
    never succeeds. ``Connection.connect`` reads ``self.url`` once per attempt, so
    while disconnected each attempt after a failed one moves on to the next URL.
    """

    def failover_urls(self, urls: list[str], *, start: int) -> None:
        self._banyan_urls = [URL(u) for u in urls]
        self._banyan_index = start
        self._banyan_rotated = time.monotonic()

    @property
    def url(self) -> URL:
        urls: list[URL] | None = self.__dict__.get("_banyan_urls")
        if not urls:
            return cast(URL, self.__dict__["_banyan_url"])
        connected = self.__dict__.get("connected")
        now = time.monotonic()
        if (
            len(urls) > 1
            and connected is not None
            and not connected.is_set()
            and now - self._banyan_rotated >= 0.8 * self.reconnect_interval
        ):
            self._banyan_index = (self._banyan_index + 1) % len(urls)
            self._banyan_rotated = now
        return urls[self._banyan_index]

    @url.setter
    def url(self, value: URL) -> None:
        self.__dict__["_banyan_url"] = value


DEFAULT_HEARTBEAT = 8
"""Seconds between AMQP heartbeats unless the URL says ``?heartbeat=N``.

Why 8 and not the broker's 60: a half-open connection (a partition, a peer that
vanished without a FIN or RST) is noticed only by missing heartbeats. aiormq
gives up after three missed intervals plus one, checked every half interval:
(8 + 1) x 3 = 27 s, noticed within about 31 s, against about 3 minutes at 60 s.
Until then publishes without confirmation "succeed" into a dead socket
(fire-and-forget is at-most-once during a partition) and consumers wait. A
lower value notices sooner but drops a connection whose event loop is blocked
that long (CPU-bound code in a handler).
"""


def with_heartbeat(url: str) -> str:
    """``url`` with ``?heartbeat=`` :data:`DEFAULT_HEARTBEAT` unless it names its own."""
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=DEFAULT_HEARTBEAT))


DEFAULT_CHANNEL_MAX = 2047
"""RabbitMQ's default ``channel_max``; a URL's ``?channel_max=N`` says the broker's own."""


def channel_max(url: str) -> int:
    """The ``channel_max`` the URL says the broker allows (RabbitMQ's default otherwise)."""
    value = URL(url.split(",")[0].strip()).query.get("channel_max", str(DEFAULT_CHANNEL_MAX))
    if not value.isdigit() or not 4 <= int(value) <= 65535:
        raise ConfigurationError(
            f"channel_max in the AMQP URL must be a whole number in 4..65535, got {value!r}"
        )
    return int(value)


def explain_refusal(exc: BaseException) -> str:
    """The broker's own reason for refusing the handshake, where aiormq hides it.

    A wrong vhost is refused with ``Connection.Close`` in answer to
    ``Connection.Open``; aiormq reports that as ``InvalidFrameError: Expected one
    of ['Connection.OpenOk'], got <Connection.Close object ...>``, which names
    neither the vhost nor the reason. The Close frame's repr (made readable in
    :func:`_readable_close_frames`) carries ``NOT_ALLOWED - vhost ... not found``.
    """
    text = str(exc)
    match = re.search(r"Connection\.Close\((?P<code>\d+), (?P<text>.*)\)>?$", text)
    if match:
        return f"the broker refused: {match['text']} (reply code {match['code']})"
    return f"{type(exc).__name__}: {text or 'no answer'}"


def _readable_close_frames() -> None:
    # pamqp's frames use object.__repr__; give the two Close frames their code and text
    # so a refusal that aiormq reports only by repr still says why (see _explain_refusal).
    def _repr(frame: spec.Connection.Close | spec.Channel.Close) -> str:
        return f"<{frame.name}({frame.reply_code}, {frame.reply_text})>"

    spec.Connection.Close.__repr__ = _repr  # type: ignore[assignment,method-assign]
    spec.Channel.Close.__repr__ = _repr  # type: ignore[assignment,method-assign]


_readable_close_frames()
