"""Names and declarations of the broker topology (DESIGN.md §3), for any transport.

::

    exchange.platform.events                          topic, routing key = "usercreated"
      └─▶ exchange.platform.events.{group}.usercreated  fanout, one per group and event
            └─▶ queue of the same name                 quorum (or classic with priorities)
                  └─ x-dead-letter ─▶ dlq.exchange.platform.events.{group}.usercreated

Every group has its own exchange so that a retry or a replay can be sent to
that group alone: other subscribers never see the duplicate.

Delayed messages leave the delay levels (``delay.py``) through
``banyan.delay.delivery`` with a routing key ending in their destination:

- a retry's destination is the group exchange itself (``<28 bits>.{group exchange}``);
- a delayed *publish* is addressed to ``exchange.platform.events.{event}``, which the
  delivery exchange forwards to the root exchange (``<28 bits>.exchange.platform.events.*``),
  where each group exchange is bound a second time with
  ``<28 bits>.exchange.platform.events.{event}``. Group names hold no dots, so neither
  pattern can match the other's keys.

Ordered subscriptions (``ordered=True``) of one group share ONE ordered stream,
whatever their event types, so that one partition key's events of all types
are handled in publish order (DESIGN.md §8)::

    exchange.platform.events.{group}.orderplaced   x-consistent-hash, one binding (weight 1)
    exchange.platform.events.{group}.ordershipped  x-consistent-hash, one binding (weight 1)
      └─▶ exchange.platform.events.{group}.ordered-stream   x-consistent-hash on x-partition-key
            └─▶ ….ordered-stream.p0 … p{N-1}          single-active-consumer queues
                  └─ x-dead-letter ─▶ ….ordered-stream.dlx   topic, "#.{event}" per type
                        └─▶ dlq.exchange.platform.events.{group}.{event}   (per type, as ever)

Each type keeps its own group exchange (still the target of retries, delayed
publishes and DLQ replays, and still ``x-consistent-hash`` as before, so an
existing deployment re-declares it unchanged); it is bound to the stream
instead of to per-type partition queues. Every route into the stream keeps a
routing key whose last word is the event's (``orderplaced``,
``<bits>.exchange.platform.events.orderplaced``,
``<bits>.exchange.platform.events.{group}.orderplaced``), which is how the
consumer picks the type's handlers and how the broker's own dead-lettering
still reaches the type's DLQ. ``-`` never occurs in an event's routing key, so
``ordered-stream`` cannot be a type's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from banyan_bus.contracts import routing_key_for
from banyan_bus.declarations import (
    BindingDecl,
    Declaration,
    ExchangeDecl,
    QueueDecl,
    QueueType,
    apply,
    at_least_once_dead_lettering,
)
from banyan_bus.delay import (
    DELAY_BITS_PATTERN,
    DELIVERY_EXCHANGE,
    delay_topology,
    destination_binding_key,
)
from banyan_bus.envelope import PRIORITY_MAX
from banyan_bus.errors import ConfigurationError
from banyan_bus.transport.base import HeaderValue

__all__ = [  # the declaration vocabulary is re-exported: plans and their records in one import
    "COMMANDS_EXCHANGE",
    "DEFAULT_PARTITIONS",
    "DLQ_PREFIX",
    "PARTITION_HEADER",
    "ROOT_EXCHANGE",
    "BindingDecl",
    "Declaration",
    "ExchangeDecl",
    "QueueDecl",
    "QueueOptions",
    "QueueType",
    "apply",
    "check_group_name",
    "command_queue",
    "dead_letter_queue",
    "delay_plan",
    "delayed_publish_destination",
    "group_exchange",
    "group_plan",
    "ordered_dead_letter_exchange",
    "ordered_exchange",
    "ordered_plan",
    "ordered_queue",
    "partition_queue",
    "queue_arguments",
    "retry_route_plan",
    "root_plan",
]

ROOT_EXCHANGE = "exchange.platform.events"
COMMANDS_EXCHANGE = "exchange.platform.commands"
DLQ_PREFIX = "dlq."
DEFAULT_DELIVERY_LIMIT = 20

_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_group_name(name: str, *, what: str = "subscription_group") -> str:
    """Group and service names become exchange-name words: no dots, 64 characters at most."""
    if not isinstance(name, str) or not _GROUP_NAME.match(name):
        raise ConfigurationError(
            f"{what} {name!r} is invalid: use 1-64 letters, digits, '-' or '_', starting "
            f"with a letter or digit (it becomes part of exchange and queue names)."
        )
    return name


def group_exchange(group: str, message_type: str) -> str:
    """``exchange.platform.events.{group}.{event}``: the group's exchange and queue name."""
    return f"{ROOT_EXCHANGE}.{group}.{routing_key_for(message_type)}"


def dead_letter_queue(group: str, message_type: str) -> str:
    """``dlq.exchange.platform.events.{group}.{event}``."""
    return DLQ_PREFIX + group_exchange(group, message_type)


def delayed_publish_destination(message_type: str) -> str:
    """The destination a delayed publish is addressed to (see the module docstring)."""
    return f"{ROOT_EXCHANGE}.{routing_key_for(message_type)}"


#: Binds the delay delivery exchange to the root exchange for delayed publishes.
DELAYED_PUBLISH_PATTERN = f"{DELAY_BITS_PATTERN}{ROOT_EXCHANGE}.*"


def partition_queue(group_exchange_name: str, index: int) -> str:
    """``exchange.platform.events.{group}.{event}.p{index}``: one queue per partition."""
    return f"{group_exchange_name}.p{index}"


def ordered_exchange(group: str) -> str:
    """``exchange.platform.events.{group}.ordered-stream``: the group's ordered stream."""
    return f"{ROOT_EXCHANGE}.{group}.ordered-stream"


def ordered_queue(group: str, index: int) -> str:
    """``exchange.platform.events.{group}.ordered-stream.p{index}``: one per partition."""
    return partition_queue(ordered_exchange(group), index)


def ordered_dead_letter_exchange(group: str) -> str:
    """Where the stream's queues dead-letter broker-side: routes on to each type's DLQ."""
    return f"{ordered_exchange(group)}.dlx"


#: The header the consistent-hash exchange of an ordered group hashes on.
PARTITION_HEADER = "x-partition-key"
DEFAULT_PARTITIONS = 4


def command_queue(message_type: str) -> str:
    return f"{COMMANDS_EXCHANGE}.{routing_key_for(message_type)}"


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """How a subscription's queue is declared. Changing these on an existing queue
    is a ``TopologyMismatch``: RabbitMQ never alters a declared queue."""

    queue_type: QueueType = "quorum"
    max_length: int | None = None
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    def __post_init__(self) -> None:
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', got {self.queue_type!r}"
            )
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or self.max_length < 1
        ):
            raise ConfigurationError(f"max_length must be a positive int, got {self.max_length!r}")
        if self.delivery_limit < 1:
            raise ConfigurationError(
                f"delivery_limit must be a positive int, got {self.delivery_limit!r}"
            )


def queue_arguments(options: QueueOptions, dlq: str) -> dict[str, HeaderValue]:
    """Arguments of a group queue: broker-side dead-lettering into its DLQ, always."""
    args: dict[str, HeaderValue] = {
        "x-queue-type": options.queue_type,
        # The default exchange routes by queue name: no DLX exchange to declare.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq,
    }
    if options.queue_type == "quorum":
        args["x-delivery-limit"] = options.delivery_limit
        args.update(at_least_once_dead_lettering())
    else:
        args["x-max-priority"] = PRIORITY_MAX
        args["x-overflow"] = "reject-publish"
    if options.max_length is not None:
        args["x-max-length"] = options.max_length
    return args


#: A DLQ is read with get + requeue (``dlq list``); each read counts as a delivery. Quorum
#: queues on RabbitMQ 4 drop a message past 20 deliveries by default, so set a limit no
#: inspection will reach.
DLQ_DELIVERY_LIMIT = 1_000_000


def dlq_arguments(options: QueueOptions) -> dict[str, HeaderValue]:
    if options.queue_type == "quorum":
        return {"x-queue-type": "quorum", "x-delivery-limit": DLQ_DELIVERY_LIMIT}
    return {"x-queue-type": options.queue_type}


def root_plan() -> list[Declaration]:
    """What every bus declares: the events root, and the commands exchange (so a
    command nobody owns is refused as unroutable instead of closing the channel)."""
    return [ExchangeDecl(ROOT_EXCHANGE, "topic"), ExchangeDecl(COMMANDS_EXCHANGE, "direct")]


def group_plan(group: str, message_type: str, options: QueueOptions) -> list[Declaration]:
    """What one group's (unordered) subscription declares, in order: DLQ, exchange,
    queue, bindings. Ordered subscriptions declare ``ordered_plan`` instead."""
    name = group_exchange(group, message_type)
    dlq = dead_letter_queue(group, message_type)
    return [
        QueueDecl(dlq, dlq_arguments(options)),
        ExchangeDecl(name, "fanout"),
        QueueDecl(name, queue_arguments(options, dlq)),
        BindingDecl(name, name, "queue"),
        *_root_bindings(name, message_type),
    ]


def _root_bindings(name: str, message_type: str) -> list[Declaration]:
    delayed_key = DELAY_BITS_PATTERN + delayed_publish_destination(message_type)
    return [
        BindingDecl(ROOT_EXCHANGE, name, "exchange", routing_key_for(message_type)),
        BindingDecl(ROOT_EXCHANGE, name, "exchange", delayed_key),
    ]


def ordered_plan(
    group: str, message_types: Sequence[str], options: QueueOptions, *, partitions: int
) -> list[Declaration]:
    """What a group's ordered subscriptions declare together: one ordered stream.

    The stream is an ``x-consistent-hash`` exchange hashing ``x-partition-key``
    over ``partitions`` queues, each with a single active consumer, so one key
    always lands on one queue read by one consumer, whatever the event's type.
    Each type's group exchange feeds it (see the module docstring). The queues
    dead-letter broker-side through a topic exchange that sends each message to
    its own type's DLQ (a queue has one dead-letter target, the stream many types).
    """
    stream = ordered_exchange(group)
    dlx = ordered_dead_letter_exchange(group)
    plan: list[Declaration] = [ExchangeDecl(dlx, "topic")]
    for message_type in message_types:
        dlq = dead_letter_queue(group, message_type)
        plan += [
            QueueDecl(dlq, dlq_arguments(options)),
            BindingDecl(dlx, dlq, "queue", f"#.{routing_key_for(message_type)}"),
        ]
    plan.append(ExchangeDecl(stream, "x-consistent-hash", {"hash-header": PARTITION_HEADER}))
    for index in range(partitions):
        queue = ordered_queue(group, index)
        arguments = queue_arguments(options, "")
        arguments["x-dead-letter-exchange"] = dlx
        del arguments["x-dead-letter-routing-key"]  # keep the message's own key
        arguments["x-single-active-consumer"] = True
        plan += [QueueDecl(queue, arguments), BindingDecl(stream, queue, "queue", "1")]
    for message_type in message_types:
        name = group_exchange(group, message_type)
        plan += [
            ExchangeDecl(name, "x-consistent-hash", {"hash-header": PARTITION_HEADER}),
            BindingDecl(name, stream, "exchange", "1"),
            *_root_bindings(name, message_type),
        ]
    return plan


def delay_plan() -> list[Declaration]:
    """The delay levels (``delay.py``) plus the delivery exchange's route to the root."""
    plan = delay_topology().plan()
    plan.append(BindingDecl(DELIVERY_EXCHANGE, ROOT_EXCHANGE, "exchange", DELAYED_PUBLISH_PATTERN))
    return plan


def retry_route_plan(queue_name: str) -> list[Declaration]:
    """Lets delayed retries of a group reach its exchange (and only its exchange)."""
    return [
        BindingDecl(DELIVERY_EXCHANGE, queue_name, "exchange", destination_binding_key(queue_name))
    ]
