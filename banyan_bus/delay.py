"""Delays without a plugin: the broker topology that waits, and the route into it.

The scheme NServiceBus's RabbitMQ transport uses. RabbitMQ has no built-in
"deliver at"; the delayed-message plugin keeps messages in a non-replicated
Mnesia table and is not always installed. Instead a delay of *d* seconds is
written in binary into the routing key, and 28 *levels* of exchange + queue
wait for it: the queue of level *n* holds every message for exactly 2^n
seconds (a queue-level TTL, so expiry is FIFO and a short message never waits
behind a long one), then dead-letters it to level *n-1*. Each level's exchange
looks at bit *n* of the key: 1 → its queue (wait 2^n s), 0 → straight on to
the next level. After level 0 the message reaches the delivery exchange, whose
per-destination binding (28 ``*`` words, then the destination's name) hands it
to the real exchange. The sum of the waits is exactly *d*.

:func:`delay_topology` describes that topology in the declaration vocabulary
(``declarations.py``), so each transport only declares what it is given, and
the unit tests check the routing by simulation instead of against a broker.
What a user may write as ``after=`` is parsed in ``after.py`` (re-exported
here for the callers that think of both as "delay").
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from banyan_bus.after import EPOCH_MS_THRESHOLD, MAX_DELAY, MAX_DELAY_MS, parse_after
from banyan_bus.declarations import (
    BindingDecl,
    Declaration,
    ExchangeDecl,
    QueueDecl,
    QueueType,
    at_least_once_dead_lettering,
)
from banyan_bus.transport.base import Arguments, HeaderValue

__all__ = [
    "DELAY_BITS_PATTERN",
    "DELIVERY_EXCHANGE",
    "EPOCH_MS_THRESHOLD",
    "LEVEL_PREFIX",
    "MAX_DELAY",
    "MAX_DELAY_MS",
    "MAX_LEVEL",
    "MAX_ROUTABLE_DELAY_S",
    "DelayRoute",
    "DelayTopology",
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


MAX_LEVEL = 27
"""Highest level: 28 levels (0..27) encode up to 2^28-1 s ≈ 8.5 years."""

MAX_ROUTABLE_DELAY_S = 2 ** (MAX_LEVEL + 1) - 1
"""The longest delay the topology can express, in seconds (268 435 455)."""

LEVEL_PREFIX = "banyan.delay.level."
DELIVERY_EXCHANGE = "banyan.delay.delivery"

_SHORTSTR_MAX = 255  # AMQP 0-9-1 routing keys are shortstr: at most 255 bytes

DELAY_BITS_PATTERN = "*." * (MAX_LEVEL + 1)
"""The 28 bit-words of any delay routing key, exactly (see :func:`destination_binding_key`)."""


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
    return DELAY_BITS_PATTERN + destination


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
class DelayTopology:
    """The whole delay topology, in declaration order.

    Declare all ``exchanges``, then all ``queues``, then all ``bindings``: an
    exchange-to-exchange binding needs both ends to exist, and a queue's
    dead-letter exchange should exist before messages expire into it.
    """

    exchanges: tuple[ExchangeDecl, ...]
    queues: tuple[QueueDecl, ...]
    bindings: tuple[BindingDecl, ...]
    delivery_exchange: str = DELIVERY_EXCHANGE
    queue_type: QueueType = "quorum"

    def plan(self) -> list[Declaration]:
        """Everything, in declaration order, for ``declarations.apply``."""
        return [*self.exchanges, *self.queues, *self.bindings]


def _queue_arguments(level: int, queue_type: QueueType) -> Arguments:
    dead_letter = level_name(level - 1) if level > 0 else DELIVERY_EXCHANGE
    arguments: dict[str, HeaderValue] = {
        "x-queue-type": queue_type,
        "x-message-ttl": 2**level * 1000,
        "x-dead-letter-exchange": dead_letter,
    }
    if queue_type == "quorum":
        # A waiting message stays until the next level confirmed it.
        arguments.update(at_least_once_dead_lettering())
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
    exchanges: list[ExchangeDecl] = []
    queues: list[QueueDecl] = []
    bindings: list[BindingDecl] = []
    for level in range(MAX_LEVEL, -1, -1):
        name = level_name(level)
        skip = "*." * (MAX_LEVEL - level)
        next_exchange = level_name(level - 1) if level > 0 else DELIVERY_EXCHANGE
        exchanges.append(ExchangeDecl(name, "topic"))
        queues.append(QueueDecl(name, _queue_arguments(level, queue_type)))
        bindings.append(BindingDecl(name, name, "queue", f"{skip}1.#"))
        bindings.append(BindingDecl(name, next_exchange, "exchange", f"{skip}0.#"))
    exchanges.append(ExchangeDecl(DELIVERY_EXCHANGE, "topic"))
    return DelayTopology(
        exchanges=tuple(exchanges),
        queues=tuple(queues),
        bindings=tuple(bindings),
        queue_type=queue_type,
    )
