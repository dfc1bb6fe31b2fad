"""Delays: what ``after=`` means, and the broker topology that waits for it.

Two halves, both pure (no I/O), so the bus and every transport agree on them:

1. :func:`parse_after` turns what a user may write (``1500``, ``"2 hours"``,
   ``"2022-01-14T17:46:05.811Z"``, a ``timedelta`` ...) into one number, the
   delay in milliseconds, and refuses everything ambiguous or out of range with
   a message that lists what is accepted. Keeping this in one place means
   ``publish(after=...)`` and tooling accept exactly the same forms.

2. The plugin-free delay topology (the scheme NServiceBus's RabbitMQ transport
   uses). RabbitMQ has no built-in "deliver at"; the delayed-message plugin
   keeps messages in a non-replicated Mnesia table and is not always
   installed. Instead a delay of *d* seconds is written in binary into the
   routing key, and 28 *levels* of exchange + queue wait for it: the queue of
   level *n* holds every message for exactly 2^n seconds (a queue-level TTL, so
   expiry is FIFO and a short message never waits behind a long one), then
   dead-letters it to level *n-1*. Each level's exchange looks at bit *n* of
   the key: 1 → its queue (wait 2^n s), 0 → straight on to the next level. After
   level 0 the message reaches the delivery exchange, whose per-destination
   binding (28 ``*`` words, then the destination's name) hands it to the real
   exchange. The sum of the waits is exactly *d*.

   :func:`delay_topology` describes that topology as data, so each transport
   only has to declare what it is given, and the unit tests can check the
   routing by simulation instead of against a broker.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from types import MappingProxyType
from typing import Literal, NoReturn

__all__ = [
    "DELIVERY_EXCHANGE",
    "EPOCH_MS_THRESHOLD",
    "LEVEL_PREFIX",
    "MAX_DELAY",
    "MAX_DELAY_MS",
    "MAX_LEVEL",
    "MAX_ROUTABLE_DELAY_S",
    "BindingSpec",
    "DelayRoute",
    "DelayTopology",
    "ExchangeSpec",
    "QueueSpec",
    "QueueType",
    "delay_route",
    "delay_seconds",
    "delay_topology",
    "destination_binding_key",
    "first_level",
    "level_name",
    "parse_after",
    "parse_routing_key",
    "routing_key",
]

# ---------------------------------------------------------------------------
# Part 1: parsing ``after=``
# ---------------------------------------------------------------------------

EPOCH_MS_THRESHOLD = 10**12
"""A number this large is a point in time (epoch milliseconds), not a duration.

Rule: **an int of 13 digits or more is a point in time, not a duration.**
10**12 ms after the epoch is 2001-09-09T01:46:40Z, so every current timestamp
(``int(time.time() * 1000)``) is above it, while a *duration* that large
(≈ 31.7 years) could never be valid anyway (see :data:`MAX_DELAY`). The two
readings therefore never compete. The same rule applies to floats, so
``time.time() * 1000 + 5000`` works as well.
"""

MAX_DELAY = timedelta(days=366)
"""The longest accepted delay: 366 days.

Why 366 days rather than "now + 1 calendar year": a fixed limit does not
depend on the clock, so a duration (``1500``, ``timedelta``) is valid or not
regardless of when it is published, and ``"1 year"`` / ``"12 months"`` —
365 or 366 days depending on leap years — are always accepted. The delay
topology could hold ~8.5 years; the limit exists to catch unit mistakes
(seconds passed as milliseconds, a year typed for a month) before they park a
message out of sight for a decade.
"""

MAX_DELAY_MS = 366 * 24 * 60 * 60 * 1000
""":data:`MAX_DELAY` in milliseconds (31 622 400 000)."""

_MS_PER_UNIT: dict[str, int] = {
    "seconds": 1_000,
    "minutes": 60_000,
    "hours": 3_600_000,
    "days": 86_400_000,
    "weeks": 604_800_000,
}

# Short forms are accepted only where nobody could read them two ways. Plain
# "m" is refused on purpose: minutes to some, months to others.
_UNIT_ALIASES: dict[str, str] = {
    **{a: "seconds" for a in ("s", "sec", "secs", "second", "seconds")},
    **{a: "minutes" for a in ("min", "mins", "minute", "minutes")},
    **{a: "hours" for a in ("h", "hr", "hrs", "hour", "hours")},
    **{a: "days" for a in ("d", "day", "days")},
    **{a: "weeks" for a in ("w", "wk", "wks", "week", "weeks")},
    **{a: "months" for a in ("month", "months")},
    **{a: "years" for a in ("y", "yr", "yrs", "year", "years")},
}

_AMOUNT_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]+)\s*$")

_ACCEPTED = (
    "accepted: a positive number of milliseconds (1500); an epoch-milliseconds "
    "timestamp, i.e. a number >= 10**12 (1642182365811); an ISO-8601 time with an "
    "offset ('2022-01-14T17:46:05.811Z'); '<number> <unit>' with unit "
    "seconds|minutes|hours|days|weeks (decimals allowed) or months|years (whole "
    "numbers), singular or plural, or s|sec|secs|min|mins|h|hr|hrs|d|w|wk|wks|y|yr|yrs; "
    "a positive timedelta; a timezone-aware datetime. The delay must be > 0 and at "
    "most 366 days."
)


def _refuse(value: object, problem: str) -> NoReturn:
    raise ValueError(f"invalid delay after={value!r}: {problem}; {_ACCEPTED}")


def _ceil_ms_from_us(us: int) -> int:
    # Rounding up, never down: a delayed message may arrive a little late but
    # never before the moment the caller asked for.
    return -(-us // 1000)


def _checked(value: object, ms: int | Fraction | float) -> int:
    if ms <= 0:
        _refuse(value, "the delay is zero or in the past")
    if ms > MAX_DELAY_MS:
        _refuse(value, "the delay is more than 366 days ahead")
    return math.ceil(ms)


def _from_timedelta(value: object, delta: timedelta) -> int:
    us = delta // timedelta(microseconds=1)
    if us <= 0:
        _refuse(value, "the delay is zero or in the past")
    return _checked(value, _ceil_ms_from_us(us))


def _add_months(moment: datetime, months: int) -> datetime:
    # Calendar months, clamped to the month's end: Jan 31 + 1 month is Feb 28
    # (or 29), not Mar 3 — what people mean by "in a month".
    years, month_index = divmod(moment.month - 1 + months, 12)
    year = moment.year + years
    month = month_index + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _parse_amount(value: str, now: datetime) -> int | None:
    match = _AMOUNT_RE.match(value)
    if match is None:
        return None
    number, unit_text = match["number"], match["unit"].lower()
    unit = _UNIT_ALIASES.get(unit_text)
    if unit is None:
        hint = " ('m' is ambiguous: write 'min' or 'month')" if unit_text == "m" else ""
        _refuse(value, f"unknown unit {match['unit']!r}{hint}")
    if unit in {"months", "years"}:
        if not number.isdigit():
            _refuse(value, f"{unit} take a whole number (calendar arithmetic)")
        months = int(number) * (12 if unit == "years" else 1)
        if months == 0:
            _refuse(value, "the delay is zero or in the past")
        if months > 12:
            # 13 calendar months are at least 393 days: over the limit without
            # computing a date (which could overflow year 9999).
            _refuse(value, "the delay is more than 366 days ahead")
        utc_now = now.astimezone(UTC)
        return _from_timedelta(value, _add_months(utc_now, months) - utc_now)
    # Fraction keeps "0.1 seconds" exactly 100 ms (a float would give 100.00000000000001
    # and round up to 101).
    return _checked(value, Fraction(number) * _MS_PER_UNIT[unit])


def _parse_string(value: str, now: datetime) -> int:
    amount = _parse_amount(value, now)
    if amount is not None:
        return amount
    text = value.strip().upper()  # 't'/'z' are ISO-8601 too; nothing else is case-sensitive
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _refuse(value, "not a duration or an ISO-8601 time")
    if moment.tzinfo is None or moment.utcoffset() is None:
        _refuse(value, "the time has no UTC offset, so it is ambiguous (add 'Z' or '+00:00')")
    return _from_timedelta(value, moment - now)


def _epoch_ms(moment: datetime) -> Fraction:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return Fraction((moment - epoch) // timedelta(microseconds=1), 1000)


def parse_after(
    after: int | float | str | datetime | timedelta,
    *,
    now: datetime | None = None,
) -> int:
    """Return the delay ``after`` asks for, in whole milliseconds (> 0).

    Forms (anything else raises :class:`ValueError` naming the value and
    listing these):

    * ``int``/``float``: milliseconds (``1500``), rounded up to a whole ms —
      unless it is ``>= EPOCH_MS_THRESHOLD``: then it is an epoch-milliseconds
      timestamp and the result is the time until then.
    * ``str``: ``"<number> <unit>"`` — units ``seconds minutes hours days
      weeks`` (decimals allowed) and ``months years`` (whole numbers only,
      calendar arithmetic in UTC, clamped to month end: Jan 31 + 1 month =
      Feb 28/29), singular or plural, case and surrounding whitespace
      ignored, the space optional. Short forms: ``s sec secs min mins h hr
      hrs d w wk wks y yr yrs``; plain ``m`` is refused (minutes or months?).
    * ``str``: an ISO-8601 time with an offset (``"...Z"``, ``"+00:00"``,
      ``"+02:00"``); without one it is refused as ambiguous.
    * ``timedelta``; ``datetime`` if timezone-aware (naive is ambiguous).

    The result must be > 0 (not zero, not in the past) and at most
    :data:`MAX_DELAY` (366 days). ``bool`` is refused although it is an
    ``int``: ``after=True`` is a bug, not a 1 ms delay. ``now`` exists so tests
    and callers that already read the clock get consistent answers; it
    defaults to ``datetime.now(UTC)`` and must be timezone-aware.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now={now!r} must be timezone-aware (e.g. datetime.now(UTC))")

    if isinstance(after, bool):
        _refuse(after, "a bool is not a delay")
    if isinstance(after, int | float):
        if not math.isfinite(after):
            _refuse(after, "not a finite number")
        if after >= EPOCH_MS_THRESHOLD:
            return _checked(after, Fraction(after) - _epoch_ms(now))
        return _checked(after, after)
    if isinstance(after, str):
        return _parse_string(after, now)
    if isinstance(after, timedelta):
        return _from_timedelta(after, after)
    if isinstance(after, datetime):
        if after.tzinfo is None or after.utcoffset() is None:
            _refuse(after, "a naive datetime is ambiguous (give it a tzinfo, e.g. UTC)")
        return _from_timedelta(after, after - now)
    _refuse(after, f"unsupported type {type(after).__name__}")


# ---------------------------------------------------------------------------
# Part 2: the delay topology
# ---------------------------------------------------------------------------

MAX_LEVEL = 27
"""Highest level: 28 levels (0..27) encode up to 2^28-1 s ≈ 8.5 years."""

MAX_ROUTABLE_DELAY_S = 2 ** (MAX_LEVEL + 1) - 1
"""The longest delay the topology can express, in seconds (268 435 455)."""

LEVEL_PREFIX = "banyan.delay.level."
DELIVERY_EXCHANGE = "banyan.delay.delivery"

_SHORTSTR_MAX = 255  # AMQP 0-9-1 routing keys are shortstr: at most 255 bytes

QueueType = Literal["quorum", "classic"]


def level_name(level: int) -> str:
    """Name of level ``level``'s exchange and of its queue (they share it).

    Two digits so the levels sort in order in the management UI.
    """
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be an int in 0..{MAX_LEVEL}, got {level!r}")
    return f"{LEVEL_PREFIX}{level:02d}"


def delay_seconds(delay_ms: int) -> int:
    """Whole seconds the topology will wait for a ``delay_ms`` delay.

    The levels' TTLs are whole seconds, so that is the resolution: the delay is
    rounded *up* (a message is never delivered early) and is at least 1 s (a
    delayed publish always goes through the topology; callers that want no
    delay should not use it).
    """
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or delay_ms < 0:
        raise ValueError(f"delay_ms must be an int >= 0, got {delay_ms!r}")
    return max(1, -(-delay_ms // 1000))


def _check_delay_s(delay_s: int) -> None:
    if (
        isinstance(delay_s, bool)
        or not isinstance(delay_s, int)
        or not 1 <= delay_s <= MAX_ROUTABLE_DELAY_S
    ):
        raise ValueError(
            f"delay_s must be an int in 1..{MAX_ROUTABLE_DELAY_S} (2^28-1), got {delay_s!r}"
        )


def _check_destination(destination: str) -> None:
    # '*' and '#' would turn the destination binding into a wildcard that
    # catches other destinations' messages.
    if not isinstance(destination, str) or not destination or any(c in destination for c in "*#"):
        raise ValueError(
            f"destination must be a non-empty exchange name without '*' or '#', got {destination!r}"
        )


def routing_key(delay_s: int, destination: str) -> str:
    """The routing key that carries a ``delay_s`` delay to ``destination``.

    28 dot-separated bits, level 27 (most significant) first, then the
    destination exchange's name: each level's bindings test "its" word, and
    the delivery exchange's :func:`destination_binding_key` matches the tail. The
    destination may itself contain dots. The whole key must fit an AMQP
    shortstr (255 bytes), which leaves 199 bytes for the destination.
    """
    _check_delay_s(delay_s)
    _check_destination(destination)
    bits = ".".join("1" if delay_s >> level & 1 else "0" for level in range(MAX_LEVEL, -1, -1))
    key = f"{bits}.{destination}"
    size = len(key.encode())
    if size > _SHORTSTR_MAX:
        raise ValueError(
            f"routing key for destination {destination!r} would be {size} bytes, over the "
            f"AMQP limit of {_SHORTSTR_MAX}; use a destination name of at most "
            f"{_SHORTSTR_MAX - 2 * (MAX_LEVEL + 1)} bytes"
        )
    return key


def first_level(delay_s: int) -> int:
    """The level a ``delay_s`` message is first published to: its highest set bit.

    Publishing straight there skips the levels above, whose bits are all 0
    (starting at level 27 would work too, just with more exchange hops).
    """
    _check_delay_s(delay_s)
    return delay_s.bit_length() - 1


def parse_routing_key(rk: str) -> tuple[int, str]:
    """Inverse of :func:`routing_key`: ``(delay_s, destination)``.

    For tooling (inspecting a level queue) and tests.
    """
    parts = rk.split(".", MAX_LEVEL + 1)
    if len(parts) != MAX_LEVEL + 2 or any(bit not in {"0", "1"} for bit in parts[:-1]):
        raise ValueError(
            f"not a delay routing key (28 dot-separated bits, then the destination): {rk!r}"
        )
    delay_s = int("".join(parts[:-1]), 2)
    destination = parts[-1]
    if delay_s == 0 or not destination:
        raise ValueError(f"delay routing key with zero delay or no destination: {rk!r}")
    return delay_s, destination


def destination_binding_key(destination: str) -> str:
    """Binding key from the delivery exchange to ``destination``.

    Exactly 28 ``*`` words (the bits, whatever they are) and then the name.
    Not NServiceBus's ``#.<destination>``: ``#`` also swallows leading words
    of a *longer* name, so ``#.exchange.platform.events.g.e`` would match a
    message for ``dlq.exchange.platform.events.g.e`` too and deliver it to
    both. Fixing the word count makes the name match exactly. The bus
    declares this binding once per destination exchange that receives
    delayed messages.
    """
    _check_destination(destination)
    return "*." * (MAX_LEVEL + 1) + destination


@dataclass(frozen=True, slots=True)
class DelayRoute:
    """Where to publish a delayed message: ``exchange`` with ``routing_key``."""

    exchange: str
    routing_key: str
    delay_s: int


def delay_route(delay_ms: int, destination: str) -> DelayRoute:
    """Everything the bus needs to send a message ``delay_ms`` late to ``destination``."""
    seconds = delay_seconds(delay_ms)
    key = routing_key(seconds, destination)
    return DelayRoute(level_name(first_level(seconds)), key, seconds)


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """An exchange to declare (durable, never auto-deleted)."""

    name: str
    type: Literal["topic"] = "topic"
    durable: bool = True


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue to declare with exactly these arguments.

    The arguments must match on every declare (RabbitMQ refuses a redeclare
    with different ones), which is why they are computed here once.
    """

    name: str
    arguments: Mapping[str, str | int] = field(hash=False)
    durable: bool = True


@dataclass(frozen=True, slots=True)
class BindingSpec:
    """A binding from exchange ``source`` to a queue or exchange ``destination``."""

    source: str
    destination: str
    destination_kind: Literal["queue", "exchange"]
    routing_key: str


@dataclass(frozen=True, slots=True)
class DelayTopology:
    """The whole delay topology, in declaration order.

    Declare all ``exchanges``, then all ``queues``, then all ``bindings``: an
    exchange-to-exchange binding needs both ends to exist, and a queue's
    dead-letter exchange should exist before messages expire into it.
    """

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]
    delivery_exchange: str = DELIVERY_EXCHANGE
    queue_type: QueueType = "quorum"


def _queue_arguments(level: int, queue_type: QueueType) -> Mapping[str, str | int]:
    dead_letter = level_name(level - 1) if level > 0 else DELIVERY_EXCHANGE
    arguments: dict[str, str | int] = {
        "x-queue-type": queue_type,
        "x-message-ttl": 2**level * 1000,
        "x-dead-letter-exchange": dead_letter,
    }
    if queue_type == "quorum":
        # at-least-once dead-lettering keeps a message until the next level
        # confirmed it (the default, at-most-once, may lose it on a crash);
        # RabbitMQ requires reject-publish overflow for that strategy.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return MappingProxyType(arguments)


def delay_topology(queue_type: QueueType = "quorum") -> DelayTopology:
    """Describe the delay topology for a transport to declare.

    For each level *n* (27 down to 0): a topic exchange and a queue, both
    named :func:`level_name` ``(n)``; the queue holds messages 2^n s and then
    dead-letters them to level *n-1* (the delivery exchange after level 0).
    The exchange routes on word ``27-n`` of the key (bit *n*): ``1`` → its
    queue, ``0`` → the next level's exchange.

    ``queue_type="quorum"`` (default) replicates the waiting messages and
    dead-letters at-least-once; ``"classic"`` is for brokers or test setups
    without quorum queues (dead-lettering is then at-most-once).
    """
    if queue_type not in ("quorum", "classic"):
        raise ValueError(f"queue_type must be 'quorum' or 'classic', got {queue_type!r}")
    exchanges: list[ExchangeSpec] = []
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    for level in range(MAX_LEVEL, -1, -1):
        name = level_name(level)
        skip = "*." * (MAX_LEVEL - level)
        next_exchange = level_name(level - 1) if level > 0 else DELIVERY_EXCHANGE
        exchanges.append(ExchangeSpec(name))
        queues.append(QueueSpec(name, _queue_arguments(level, queue_type)))
        bindings.append(BindingSpec(name, name, "queue", f"{skip}1.#"))
        bindings.append(BindingSpec(name, next_exchange, "exchange", f"{skip}0.#"))
    exchanges.append(ExchangeSpec(DELIVERY_EXCHANGE))
    return DelayTopology(
        exchanges=tuple(exchanges),
        queues=tuple(queues),
        bindings=tuple(bindings),
        queue_type=queue_type,
    )
